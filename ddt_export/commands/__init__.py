"""The CLI's command bodies: parse, call one library function, print. `cli.py` registers them on the app."""
