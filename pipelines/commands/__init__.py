"""One module per group of CLI sub-commands; each exposes `register(subparsers)`."""
