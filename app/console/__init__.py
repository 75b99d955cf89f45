"""What the console does, without Qt: wizard flows and their validation, tested on their own. The console's
Qt pages (``ui/``) only render these and hand the user's input to them."""
