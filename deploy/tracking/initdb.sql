-- Run once by the postgres image on an empty volume (docker-entrypoint-initdb.d): the auth
-- app's users and permissions live beside the tracking store, in their own database.
CREATE DATABASE mlflow_auth OWNER mlflow;
