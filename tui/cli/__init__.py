"""The ``mergescope`` command line. Heavy libraries (torch, textual) are imported by the commands that use them."""
