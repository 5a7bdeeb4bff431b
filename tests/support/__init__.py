"""Real servers on loopback for the tests: S3 (moto) and an image host."""
