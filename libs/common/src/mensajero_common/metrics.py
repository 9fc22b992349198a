"""Prometheus metrics of every service, defined once so names and labels stay consistent.

Each service runs as its own process, so the default registry of prometheus-client is
enough; `/metrics` of each process shows what that process counted.
"""

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "mensajero_http_requests_total",
    "HTTP requests answered, by route template and status code.",
    ["service", "method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "mensajero_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["service", "method", "route"],
)
MESSAGE_STATUS_CHANGES = Counter(
    "mensajero_message_status_changes_total",
    "Messages that entered each status, counted by the service that moved them.",
    ["service", "status"],
)
TASK_PUSH_LATENCY = Histogram(
    "mensajero_task_push_latency_seconds",
    "Time from a message's creation to its task frame being written to the phone's socket.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CONNECTED_DEVICES = Gauge(
    "mensajero_connected_devices",
    "Phones connected to this device-hub process.",
)
STREAM_LAG = Gauge(
    "mensajero_stream_lag_entries",
    "Entries of a stream that its consumer group has not read or not acknowledged yet.",
    ["stream"],
)
WEBHOOK_ATTEMPTS = Counter(
    "mensajero_webhook_attempts_total",
    "Webhook POST attempts, by outcome (succeeded, retry, failed, cancelled).",
    ["outcome"],
)
JOB_DURATION = Histogram(
    "mensajero_job_duration_seconds",
    "Duration of periodic and queued jobs, by job name.",
    ["job"],
)
