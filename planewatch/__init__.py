"""The `planewatch` command: the node collector (`serve`), the cluster-mode server
(`cluster`) and the /metrics reader (`inspect`). Everything else is a library
this package puts together; nothing below imports it."""
