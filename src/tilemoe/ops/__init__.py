"""Public launchers (validate -> allocate -> grid -> launch), each with a plain-PyTorch ``*_torch`` reference."""
