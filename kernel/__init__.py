"""The kernel interfaces every layer stands on: entering a network namespace
(nsenter) and the rtnetlink codec (rtnl). Imports nothing of planewatch."""
