"""The paper's experiments (Tables 1-3) as configs and one command per row; above pipeline/
and trainer/, which never import it."""
