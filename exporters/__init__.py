"""What planewatch serves: the exposition of the sources' families, the aiohttp
server and its guards, and the `planewatch` command (`cli`: `serve` the node
collector, `cluster` the cluster-mode server, `inspect` the /metrics reader),
which puts the libraries below together; nothing below imports it."""
