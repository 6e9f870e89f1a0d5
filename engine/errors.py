"""One exception type for every user-facing problem.

The CLI turns it into a single line "error: <problem> — <fix>" and exit code 2; anything
else is a bug and may show a traceback.
"""


class MinigptError(Exception):
    """A problem the user can fix: says what is wrong and what to do."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem} — {self.fix}" if self.fix else self.problem
