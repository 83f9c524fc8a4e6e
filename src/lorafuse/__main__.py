"""`python -m lorafuse`, as `accelerate launch -m lorafuse ...` runs the CLI."""

from lorafuse.cli import main

if __name__ == "__main__":
    main()
