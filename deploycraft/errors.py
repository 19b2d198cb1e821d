"""User-facing errors: one actionable line each (what is wrong, where, what to do)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (recipe, paths, data). The CLI prints one line and exits 2."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None, source: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.fix = fix
        self.source = source

    def one_line(self) -> str:
        where = ": ".join(p for p in (self.source, self.field) if p)
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text += f" — fix: {self.fix}"
        return " ".join(text.split())  # never more than one line

    def __str__(self) -> str:
        return self.one_line()


class GateFailure(Exception):
    """A verification gate failed: the run completed but its artifact does not meet the recipe's limits."""

    exit_code = 1


class StageFailure(Exception):
    """A stage failed for a reason that is not the user's input: one line, the traceback in the run's log."""

    exit_code = 1

    def __init__(self, stage: str, cause: BaseException, run_dir=None):
        self.stage, self.cause, self.run_dir = stage, cause, run_dir
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        where = f" (traceback in {run_dir}/log.txt)" if run_dir is not None else ""
        super().__init__(f"stage {stage} failed: {type(cause).__name__}{': ' + first if first else ''}{where}")
