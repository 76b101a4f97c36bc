"""Hardware simulators, drivable from tests, the demo and the command line."""
