"""`govledger bench`: each scenario's figure beside a baseline from the same run."""
