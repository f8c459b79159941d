"""omop_etl room."""
