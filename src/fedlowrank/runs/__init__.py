"""What a run leaves behind and how runs are driven, for both runtimes: run orchestration
(`experiment.py`: each algorithm in turn, resume, snapshots, adapters, summaries), the run
directory (`rundir.py`), summaries and plots (`report.py`), adapters and exports (`export.py`)."""
