"""Long work as tasks: the task contract (:mod:`app.tasks.base`), the runner (:mod:`app.tasks.runner`) and
subprocess workers (:mod:`app.tasks.worker`).

Nothing is imported here: a worker process imports :mod:`app.tasks.worker` and the task contract only, not
the runner and the catalog behind it (SQLAlchemy alone cost a publish's child process 0.3 s to start).
"""
