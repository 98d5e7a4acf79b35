"""The gateway's settings, read from STIPPLE_* variables (`stipple_common.settings`).

Also importable as ``stipple_gateway.app.GatewaySettings`` and
``stipple_gateway.service.GatewaySettings``."""

from __future__ import annotations

from stipple_common.settings import CommonSettings
from stipple_common.subjects import LIMITS_BUCKET


class GatewaySettings(CommonSettings, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 12_000_000  # one input image of 8 MiB (taskspec.MAX_IMAGE_BYTES) in base64, and the rest
    sync_timeout_s: float = 120.0  # how long the synchronous SDCN endpoints wait for an outcome
    default_model: str = "tiny-sd"  # for SDCN requests that name no model
    # "" = keys off (anyone may call); "id:secret:rate_per_minute[:burst],..." or "@/path/to/file"
    api_keys: str = ""
    # master secret every app's webhook secret is derived from (webhooks.app_secret); "" = webhooks off
    webhook_secret: str = ""
    webhook_secret_previous: str = ""  # while rotating webhook_secret: deliveries are signed with both
    webhook_timeout_s: float = 10.0  # one POST
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 1.0  # the first retry's delay; it doubles up to webhook_backoff_max_s
    webhook_backoff_max_s: float = 300.0
    webhook_concurrency: int = 4  # POSTs in flight per gateway
    webhook_allow_private: bool = False  # accept webhook URLs (and names resolving) to loopback / private addresses
    result_ttl_s: float = 7 * 24 * 3600.0  # images expire this long after the outcome; 0 = never
    sse_keepalive_s: float = 15.0  # comment line on an idle events stream
    max_sse_streams: int = 2000  # events streams open on this gateway at once; 0 = no cap
    max_sse_per_client: int = 20  # per API key, or per client IP with keys off; 0 = no cap
    sse_max_s: float = 3600.0  # an events stream ends after this long (the client resumes); 0 = with the task
    # callers without an API key (all of them with keys off, public routes always), per client IP; 0 = no limit
    anon_rate_per_minute: int = 6000
    anon_burst: int = 1000
    trusted_proxies: str = ""  # CIDRs whose X-Forwarded-For is believed (comma-separated); "" = the socket peer
    # rate limits (API keys, anonymous per IP) shared by every gateway through NATS KV (limits.py); off: per gateway
    shared_limits: bool = True
    # 64 hex digits: the secret task ids derive from Idempotency-Keys under (taskids.py); empty:
    # the network's own, made by the first gateway and kept in KV (subjects.GATEWAY_BUCKET)
    task_id_secret: str = ""
    limits_bucket: str = LIMITS_BUCKET  # the KV bucket of the shared limits (one per deployment of gateways)
    progress_max_tasks: int = 10_000  # tasks whose step progress is kept in memory
