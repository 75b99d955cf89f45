"""The Elastic Layer repository: its JSON schema (:mod:`app.elastic.repository`)."""
