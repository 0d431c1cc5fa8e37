"""Where the cluster secret comes from, and that it shows up nowhere it should not."""

import pytest

from mmserve.cluster_credential import SECRET_ENV, SECRET_FILE_ENV, ClusterCredential, MissingCredential


def test_file_beats_file_variable_beats_secret_variable(tmp_path):
    (tmp_path / "a").write_text("secret-from-the-flag-file\n")
    (tmp_path / "b").write_text("secret-from-the-env-file")
    (tmp_path / "a").chmod(0o600)
    (tmp_path / "b").chmod(0o400)
    env = {SECRET_FILE_ENV: str(tmp_path / "b"), SECRET_ENV: "secret-in-the-variable"}
    assert ClusterCredential.load(tmp_path / "a", env).secret == b"secret-from-the-flag-file"
    assert ClusterCredential.load(None, env).secret == b"secret-from-the-env-file"
    assert ClusterCredential.load(None, {SECRET_ENV: "secret-in-the-variable"}).secret == b"secret-in-the-variable"
    with pytest.raises(MissingCredential, match=SECRET_ENV):
        ClusterCredential.load(None, {})


def test_a_secret_file_others_can_read_is_refused_and_a_variable_is_read_as_a_file_is(tmp_path):
    """Read as is before (a 0644 file taken silently: any local user could read the cluster's
    secret), and a variable kept its trailing newline where the same secret in a file lost it."""
    secret = tmp_path / "secret"
    secret.write_text("secret-of-the-cluster-0123\n")
    for mode in (0o644, 0o640, 0o604):
        secret.chmod(mode)
        with pytest.raises(PermissionError, match=f"readable by others .*chmod 600 {secret}"):
            ClusterCredential.load(secret, {})
    secret.chmod(0o600)
    assert ClusterCredential.load(secret, {}) == ClusterCredential.load(None, {SECRET_ENV: "secret-of-the-cluster-0123\n"})


def test_short_secrets_are_refused_and_the_secret_is_never_printed():
    with pytest.raises(ValueError, match="at least 16"):
        ClusterCredential(b"short")
    credential = ClusterCredential.generate()
    assert credential.secret.decode() not in repr(credential) + str(credential)


def test_each_surface_gets_its_own_key_and_none_is_the_secret():
    credential = ClusterCredential(b"0123456789abcdef0123")
    keys = {credential.grpc_token, credential.transfer_key}
    assert len(keys) == 2 and credential.secret.decode() not in keys
    assert ClusterCredential(b"0123456789abcdef0123").grpc_token == credential.grpc_token
    assert ClusterCredential(b"0123456789abcdef0124").grpc_token != credential.grpc_token
