"""`python -m s3fsimg` is the `s3fsimg` command."""

from s3fsimg.cli import main

if __name__ == "__main__":
    main()
