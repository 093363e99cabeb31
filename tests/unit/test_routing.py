"""The member → shard mapping is a permanent contract: these vectors must never change."""

from __future__ import annotations

from migrator.routing import crc32, shard_of, sticky_bucket

VECTORS = [
    (b"", 0x00000000),
    (b"a", 0xE8B7BE43),
    (b"user:1", 0x7BA5C282),
    (b"123456789", 0xCBF43926),
]


def test_crc32_vectors() -> None:
    for member, expected in VECTORS:
        assert crc32(member) == expected


def test_shard_of_is_crc32_mod_n_on_utf8_bytes() -> None:
    assert shard_of("a", 100) == 0xE8B7BE43 % 100 == 7
    assert shard_of(b"user:1", 100) == 2
    assert shard_of("123456789", 100) == 62
    assert shard_of("ünïcode", 7) == crc32("ünïcode".encode()) % 7


def test_sticky_bucket_is_stable_and_salted() -> None:
    assert sticky_bucket("user:1", "salt-a") == sticky_bucket(b"user:1", "salt-a")
    buckets = {sticky_bucket(f"m{i}", "salt-a") for i in range(2000)}
    assert buckets == set(range(100))
    moved = sum(
        sticky_bucket(f"m{i}", "salt-a") != sticky_bucket(f"m{i}", "salt-b") for i in range(200)
    )
    assert moved > 150
