"""Fakes of the cloud APIs gpumanager drives, served over real loopback HTTP."""
