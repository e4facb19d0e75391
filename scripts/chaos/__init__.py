"""The chaos suite: real faults (kill -9, broker outage, database restart, dropped
clients) under load, against the real service, checked for loss and double consumption."""
