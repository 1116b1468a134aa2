"""`python3 agent.pyz COMMAND`: the quantlab host agent (qlagent/__init__.py says what it does).
quantlab ships this folder to each host as one zip application, named by its content hash."""
import sys

from qlagent.main import main

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except BrokenPipeError:
        sys.exit(0)
