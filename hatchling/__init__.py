"""Baby-Hatchling: a tiny hybrid (KDA + NoPE attention) language model and its training pipeline."""

import os

__version__ = "0.1.0"

# Nothing the project runs phones home: every process that imports hatchling (the CLI, DVC's stage
# commands, the Prefect flow and its workers) and their subprocesses run with MLflow's, Prefect's and
# DVC's telemetry off, unless the user's environment says otherwise. prefect.toml and .dvc/config say
# the same for those tools run by hand in the project.
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
for _name, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_name, _value)
