"""The ML library: values in, values out; no project file layout, no MLflow, no Airflow."""
