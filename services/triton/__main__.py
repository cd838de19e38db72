"""`python -m services.triton repo|serve-cpu ...`: the Triton commands without the meshpilot CLI."""

from services.triton.cli import triton_app

if __name__ == "__main__":
    triton_app(prog_name="python -m services.triton")
