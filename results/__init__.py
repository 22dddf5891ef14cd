"""A search folder read, checked and reported from its files alone, without Ray or the run's code: the records, Tune's
files, the Optuna journal, the summaries and the report. Imports base/ only."""
