"""bus.key_value: a KV bucket made when missing, and the one there bound as it is when a
replica asks with another configuration."""

from nats.js.api import KeyValueConfig

from stipple_common import bus


async def test_a_bucket_is_made_once_and_another_configuration_binds_it_as_it_is(fresh_js):
    made = await bus.key_value(fresh_js, KeyValueConfig(bucket="kvopen", history=1, description="first"))
    await made.put("k", b"v")
    again = await bus.key_value(fresh_js, KeyValueConfig(bucket="kvopen", history=1, description="other"))
    assert (await again.get("k")).value == b"v"
    info = await fresh_js.stream_info("KV_kvopen")
    assert info.config.description == "first"  # not rewritten by the second caller
