"""A backup repository on object storage (S3): content-addressed chunks plus manifests."""
