"""The pure helpers, called directly: token format, hashing, parsing, redaction."""

import argparse
import re
from datetime import datetime, timedelta, timezone

import pytest
from argon2 import PasswordHasher

import agent_identity_admin as tool


def test_token_has_the_documented_shape():
    """kan_agent_<12 base62>_<43 base62 secret><6 base62 checksum>."""
    public_id = tool.new_public_id()
    token = tool.new_token(public_id)
    assert re.fullmatch(r"kan_agent_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}", token)
    assert token.startswith(f"kan_agent_{public_id}_")
    assert tool.parse_token(token) == (public_id, None)


def test_token_checksum_is_crc32_of_everything_before_it():
    """The last six characters are the base62 CRC32 of the rest, zero-padded."""
    import zlib

    token = tool.new_token(tool.new_public_id())
    body, checksum = token[:-6], token[-6:]
    number = 0
    for char in checksum:
        number = number * 62 + tool.BASE62.index(char)
    assert number == zlib.crc32(body.encode())


def test_a_mistyped_token_fails_its_checksum():
    token = tool.new_token(tool.new_public_id())
    position = len("kan_agent_") + 20
    replacement = "A" if token[position] != "A" else "B"
    mistyped = token[:position] + replacement + token[position + 1:]
    assert tool.parse_token(mistyped) == (None, "bad_checksum")


@pytest.mark.parametrize("text", ["", "kan_agent_", "kan_agent_short_x", "ghp_" + "a" * 40, "kan_agent_" + "a" * 12 + "_" + "b" * 10])
def test_malformed_tokens_are_rejected(text):
    assert tool.parse_token(text) == (None, "malformed")


def test_secrets_differ_and_carry_256_bits():
    """43 base62 characters are at least 256 bits; two tokens never repeat."""
    import math

    assert tool.SECRET_LENGTH * math.log2(62) >= 256
    tokens = {tool.new_token("AAAAAAAAAAAA") for _ in range(200)}
    assert len(tokens) == 200


def test_base62_pads_to_width():
    assert tool.base62(0, 6) == "000000"
    assert tool.base62(61, 6) == "00000z"
    assert tool.base62(62, 6) == "000010"
    assert tool.base62(2**32 - 1, 6) == "4gfFC3"


def test_hash_is_argon2id_and_verifies_the_whole_token():
    token = tool.new_token(tool.new_public_id())
    stored = tool.hash_token(token)
    assert stored.startswith("$argon2id$v=19$m=2048,t=1,p=1$")
    assert stored.startswith(tool.ARGON2_PHC_PREFIX)
    assert token not in stored
    assert PasswordHasher().verify(stored, token)


@pytest.mark.parametrize("slug", ["a", "bot", "release-bot-2", "0", "a" * 64, "a-b-c"])
def test_valid_slugs(slug):
    assert tool.parse_slug(slug) == slug


@pytest.mark.parametrize("slug", ["", "-bot", "bot-", "Bot", "bot_1", "bot 1", "a" * 65, "bøt", "bot\x00"])
def test_invalid_slugs(slug):
    with pytest.raises(argparse.ArgumentTypeError):
        tool.parse_slug(slug)


def test_scopes_are_deduplicated_in_order():
    assert tool.parse_scopes("cards:write, boards:read,cards:write,") == ["cards:write", "boards:read"]


def test_unknown_scope_lists_the_valid_ones_and_suggests_the_closest():
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        tool.parse_scopes("boards:read,card:write")
    message = str(caught.value)
    assert "'card:write'" in message
    assert "did you mean cards:write?" in message
    assert all(scope in message for scope in tool.SCOPES)


def test_empty_scopes_are_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="at least one scope"):
        tool.parse_scopes(" , ")


@pytest.mark.parametrize("value", ["a\x00b", "line\nbreak", "tab\there", "\x1b[31mred", "cr\rhere"])
def test_text_with_control_characters_is_refused(value):
    with pytest.raises(argparse.ArgumentTypeError, match="control character"):
        tool.parse_display_name(value)


@pytest.mark.parametrize("value, code", [
    ("rtl\u202eevil", "202E"), ("\udcff", "DCFF"), ("left\u200eto right", "200E"), ("right\u200fto left", "200F"),
    ("arabic\u061cmark", "061C"), ("zero\u200bwidth", "200B"), ("joined\u200dhere", "200D"), ("bom\ufeff", "FEFF"),
    ("tag\U000e0041s", "E0041"), ("line\u2028separator", "2028"), ("paragraph\u2029separator", "2029"),
])
def test_text_with_invisible_characters_is_refused(value, code):
    """Bidirectional marks, zero-width and tag characters read as something they are not."""
    with pytest.raises(argparse.ArgumentTypeError, match=f"invisible character \\(U\\+{code}\\)"):
        tool.parse_display_name(value)


@pytest.mark.parametrize("value", [
    "kan_agent_Ab12Cd34Ef56_" + "Zz9" * 17,                 # as issued
    "Ab12Cd34Ef56_" + "Zz9Yy8Xx7" * 6,                       # without its prefix
    "leaked: " + "Zz9Yy8Xx7Ww6" * 5,                         # the secret alone
    "kan_agent_Ab12Cd34\u200bEf56_Zz9Yy8",                   # split by a zero-width space
    "Ab12Cd34Ef56_Zz9Yy8\u2060Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp9Oo8Nn7Mm6Ll5Kk4Jj3",  # and by a word joiner
])
def test_text_with_a_token_is_refused_in_every_form(value):
    with pytest.raises(argparse.ArgumentTypeError, match="contains a token with its secret"):
        tool.parse_reason(value)


@pytest.mark.parametrize("value", [
    "kan_agent_Ab12Cd34Ef56 leaked",        # a token named by its public id reveals nothing
    "deploy " + "0123456789abcdef" * 4,     # a SHA-256 in hex: no capitals
    "git " + "a" * 40, "commit 1f2e3d4c5b6a79880f1e2d3c4b5a69788f1e2d3c",
])
def test_text_that_only_looks_long_is_allowed(value):
    assert tool.parse_reason(value) == value


def test_text_limits_are_the_column_sizes():
    assert tool.parse_display_name("x" * 255)
    with pytest.raises(argparse.ArgumentTypeError, match="limit is 255"):
        tool.parse_display_name("x" * 256)
    assert tool.parse_reason("r" * 1000)
    with pytest.raises(argparse.ArgumentTypeError, match="limit is 1000"):
        tool.parse_reason("r" * 1001)


def test_unicode_names_are_allowed():
    assert tool.parse_display_name("Déploiement 🤖 bot") == "Déploiement 🤖 bot"


@pytest.mark.parametrize("value", ["Ab12Cd34Ef56", "000000000000"])
def test_valid_public_ids(value):
    assert tool.parse_public_id(value) == value


@pytest.mark.parametrize("value", ["", "short", "Ab12Cd34Ef567", "Ab12Cd34Ef5-", "'; drop--"])
def test_invalid_public_ids(value):
    with pytest.raises(argparse.ArgumentTypeError):
        tool.parse_public_id(value)


def test_iso_is_utc_with_z():
    assert tool.iso(datetime(2026, 1, 2, 3, 4, 5, 678)) == "2026-01-02T03:04:05Z"
    aware = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert tool.iso(aware) == "2026-01-02T03:04:05Z"
    assert tool.iso(None) is None


@pytest.mark.parametrize("text, masked", [
    ("password=hunter2 failed", "password=*** failed"),
    ("host=db PASSWORD = 'it\\'s here' user=u", "host=db PASSWORD = *** user=u"),  # libpq's quoting
    ("postgresql://kan:s3cr3t@db:5432/kan refused", "postgresql://kan:***@db:5432/kan refused"),
    ("nothing here", "nothing here"),
    # A password is masked where a password sits, never as a bare word: with password
    # "rt", libpq's "port 1 failed" must not read "po*** 1 faile".
    ("port 1 failed: connection refused", "port 1 failed: connection refused"),
])
def test_redact_masks_passwords_only_where_a_password_sits(text, masked):
    assert tool.redact(text) == masked


def test_format_table_aligns_columns():
    table = tool.format_table(["A", "LONGER"], [["xxxx", None], ["y", "z"]])
    assert table == ["A     LONGER", "xxxx  -", "y     z"]


@pytest.mark.parametrize("text, delta", [
    ("30m", timedelta(minutes=30)), ("12h", timedelta(hours=12)), ("90d", timedelta(days=90)),
    ("1w", timedelta(weeks=1)), ("365d", timedelta(days=365)), ("52w", timedelta(weeks=52)),
])
def test_expiry_durations(text, delta):
    assert tool.parse_expires_in(text) == tool.Duration(text, delta)


def test_never_must_be_said_by_name():
    assert tool.parse_expires_in("never") == tool.Duration("never", None)


@pytest.mark.parametrize("text, message", [
    ("366d", "longer than the limit of 365 days"), ("53w", "longer than the limit of 365 days"),
    ("8761h", "longer than the limit of 365 days"), ("0d", "longer than zero"), ("0", "not a duration"),
    ("90", "not a duration"), ("1y", "not a duration"), ("-1d", "not a duration"), ("1.5d", "not a duration"),
    ("", "not a duration"), ("9999999d", "not a duration"),
])
def test_bad_expiry_durations(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        tool.parse_expires_in(text)


def test_grace_is_zero_to_seven_days():
    assert tool.parse_grace("0") == tool.Duration("0", timedelta(0))
    assert tool.parse_grace("0m").delta == timedelta(0)
    assert tool.parse_grace("7d").delta == timedelta(days=7)
    assert tool.parse_grace("1w").delta == timedelta(days=7)
    with pytest.raises(argparse.ArgumentTypeError, match="limit of 7 days"):
        tool.parse_grace("169h")
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        tool.parse_grace("never")


@pytest.mark.parametrize("seconds, text", [
    (12 * 86400 + 5, "in 12 days"), (86400, "in 1 day"), (3 * 3600 + 59, "in 3 hours"), (61, "in 1 minute"),
    (30, "in less than a minute"), (-3 * 86400, "3 days ago"), (-7200, "2 hours ago"),
])
def test_relative_times(seconds, text):
    now = datetime(2026, 1, 1)
    assert tool.relative(now + timedelta(seconds=seconds), now) == text


def test_token_shaped_text_is_scrubbed_from_messages():
    token = tool.new_token(tool.new_public_id())
    assert tool.scrub_tokens(f"bad value {token}!") == (
        "bad value kan_agent_***! (a token on the command line lands in shell history and the process list: rotate it)"
    )
    assert tool.scrub_tokens("kan_agent_Ab12Cd34Ef56_part").startswith("kan_agent_*** ")  # a cut-off token
    assert tool.scrub_tokens("split kan_agent_Ab12Cd34\u200bEf56_Zz9").startswith("split kan_agent_*** ")
    assert tool.scrub_tokens("Ab12Cd34Ef56_" + "Zz9Yy8Xx7" * 5).startswith("*** (a token")
    # Names that only begin like a token reveal nothing: the role kan_agent_server, a public id.
    for harmless in ("nothing to see", "held by role kan_agent_server", "token kan_agent_Ab12Cd34Ef56",
                     "kan_agent_partial_"):
        assert tool.scrub_tokens(harmless) == harmless


def test_relative_times_agree_whether_cut_to_the_second_or_not():
    """A table shows times cut to the second; a warning uses exact ones: both say the same."""
    now = datetime(2026, 1, 1, 12, 0, 0, 600_000)
    expires = datetime(2026, 1, 4, 12, 0, 0, 100_000)  # 2 days 23:59:59.5 ahead
    cut = lambda moment: moment.replace(microsecond=0)  # noqa: E731
    assert tool.relative(expires, now) == tool.relative(cut(expires), cut(now)) == "in 3 days"
    assert tool.relative(now + timedelta(days=1, hours=11), now) == "in 1 day"
    assert tool.relative(now + timedelta(days=1, hours=12), now) == "in 2 days"


def test_a_moment_equal_to_now_is_past():
    now = datetime(2026, 1, 1)
    assert tool.relative(now, now) == "less than a minute ago"
    assert tool.relative(now + timedelta(seconds=1), now) == "in less than a minute"


def test_from_iso_reads_back_what_iso_writes():
    moment = datetime(2026, 11, 29, 3, 6, 38, 912345)
    assert tool.iso(moment) == "2026-11-29T03:06:38Z"
    assert tool.from_iso(tool.iso(moment)) == moment.replace(microsecond=0)


@pytest.mark.parametrize("host, port, said", [
    ("db.internal", "5432", "database kan at db.internal:5432 as role ops"),
    ("/run/postgresql", "5433", "database kan on socket /run/postgresql/.s.PGSQL.5433 as role ops"),
    ("", "5432", "database kan on the local socket, port 5432 as role ops"),
])
def test_a_target_is_named_as_libpq_reaches_it(host, port, said):
    assert tool.describe_target({"host": host, "port": port, "database": "kan", "role": "ops"}) == said


def test_did_you_mean_takes_the_nearest_of_several_that_begin_alike():
    """--d begins --database-url, --db-schema and --debug: the nearest, not the first, is named."""
    assert tool.did_you_mean("--d", ["--database-url", "--db-schema", "--debug"]) == " (did you mean --debug?)"
    assert tool.did_you_mean("--con", ["--confirm", "--database-url"]) == " (did you mean --confirm?)"
