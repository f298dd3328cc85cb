"""The controller machinery: the watch cache, the work queue, leader election and the API
client. See README.md here for how a watch event becomes a write."""
