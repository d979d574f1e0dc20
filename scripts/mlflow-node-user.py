"""The non-admin MLflow user that Ray nodes and their trials log in as. Idempotent.

Run with MLflow's admin login in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD and
MLFLOW_TRACKING_URI set; makes (or resets the password of) MLFLOW_NODE_USERNAME (default sae-node)
with MLFLOW_NODE_PASSWORD, and makes sure it is no admin. docker-compose.yml's mlflow-init service
runs it; natively, docs/deploy.md does. The user may read everything (the auth app's default
permission) and manages what it creates: the sweeps' experiments and registered families.
"""

import os
import sys

from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client


def main() -> None:
    name = os.environ.get("MLFLOW_NODE_USERNAME") or "sae-node"
    password = os.environ.get("MLFLOW_NODE_PASSWORD")
    if not password:
        sys.exit("mlflow-node-user: set MLFLOW_NODE_PASSWORD (the password the Ray nodes will log in with)")
    auth = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    try:
        auth.create_user(name, password)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.update_user_password(name, password)
    auth.update_user_admin(name, False)
    print(f"mlflow-node-user: {name} ready (not an admin)")


if __name__ == "__main__":
    main()
