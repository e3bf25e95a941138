"""``fedsynth certs``: TLS certificates and SuperNode keys of a deployed study.

A deployed study runs on Flower's own engine: the coordinator starts a SuperLink, each
hospital starts a SuperNode. Two things protect that link, and this module makes the
files both need (with ``cryptography``, nothing else):

- **TLS.** The coordinator creates a study CA (its key never leaves the coordinator's
  admin) and signs the SuperLink's server certificate with it, with subject
  alternative names for every host name and IP address the sites dial. Each site gets
  the CA *certificate* (public) and passes it to ``flower-supernode
  --root-certificates``; the SuperLink gets its key and certificate (``--ssl-keyfile``,
  ``--ssl-certfile``) and the CA certificate (``--ssl-ca-certfile``).
- **SuperNode authentication.** With ``flower-superlink --enable-supernode-auth`` only
  SuperNodes whose public key was registered (``flwr supernode register``) may join.
  Flower 1.41 reads the private key with ``load_ssh_private_key`` and refuses anything
  but an elliptic-curve key, and registration reads the public key with
  ``load_ssh_public_key`` and refuses curves that are not NIST ones; so a site's key
  pair is ECDSA on NIST P-384, the private key in OpenSSH format and the public key as
  one ``ecdsa-sha2-nistp384 ...`` line.

The right way round for a site's key pair is that the site makes it and sends only the
public key (``fedsynth certs site``); ``fedsynth certs study --site NAME`` makes site
key pairs at the coordinator too, for pilots and tests where one person plays every
part, and says so when it does.

Every file is written owner-only (0o600; folders 0o700), through a temporary file that
is renamed into place so that a crash never leaves half a key, and never over an
existing file unless ``--force`` is given: replacing a CA or a site key silently locks
parties out of the study.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import FedsynthError
from .secret_files import ensure_dir, write_private

CURVE = ec.SECP384R1

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "superlink.key"
SERVER_CERT = "superlink.crt"
AUTH_PRIVATE = "auth.key"
AUTH_PUBLIC = "auth.pub"
CA_DIR = "ca"
COORDINATOR_DIR = "coordinator"
SITES_DIR = "sites"

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# the rule `fedsynth keys` applies to the same study id (common/encryption/keys.py)
_STUDY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
#: The SuperLink certificate's longest validity (the CA's is twice as long): ten years
#: outlasts any study, and far larger values ran past the last date a certificate can
#: hold (9999-12-31) and ended in an OverflowError after the checks had passed.
MAX_DAYS = 3650
# Certificates start a little in the past so that a site whose clock runs a few minutes
# behind the coordinator's does not reject a certificate made a moment ago.
_CLOCK_SKEW = dt.timedelta(minutes=5)


class CertError(FedsynthError):
    """A problem with certificate or key files, stated with the file and the remedy."""


@dataclass(frozen=True)
class SiteAuthKeys:
    """Where one site's SuperNode authentication key pair lives."""

    site: str
    private_key: Path
    public_key: Path
    fingerprint: str


@dataclass(frozen=True)
class StudyCerts:
    """What ``create_study_certs`` wrote."""

    folder: Path
    ca_key: Path
    ca_cert: Path
    server_key: Path
    server_cert: Path
    hosts: tuple[str, ...]
    sites: dict[str, SiteAuthKeys] = field(default_factory=dict)


# --------------------------------------------------------------------------- file helpers


def _ensure_dir(path: Path) -> None:
    ensure_dir(path, CertError)


def _write_private(path: Path, data: bytes, *, force: bool) -> None:
    write_private(path, data, force=force, error=CertError, hint="(pass --force)")


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    """Check every target before writing any, so a refusal leaves no partial set."""
    if force:
        return
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise CertError(
            f"{existing[0]} already exists; refusing to overwrite certificates or keys "
            "(move the folder away, or pass --force if you really mean to replace them: "
            "parties holding the old files will no longer connect)"
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise CertError(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:
        raise CertError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- validation


def check_site_name(name: str) -> str:
    """A site name usable as a folder name and a SuperNode name."""
    if not _SITE_NAME.fullmatch(name):
        raise CertError(
            f"site name {name!r} is not usable: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _general_name(host: str) -> x509.GeneralName:
    """An IP address SAN for addresses, a DNS SAN for names (TLS checks them separately)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    label = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
    if len(host) > 253 or not all(label.fullmatch(part) for part in host.split(".")):
        raise CertError(
            f"{host!r} is neither an IP address nor a valid host name; give the name or "
            "address the sites will use to reach the SuperLink"
        )
    return x509.DNSName(host.lower())


# --------------------------------------------------------------------------- keys and certs


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ssh_fingerprint(public_line: bytes | str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line, to read out by phone.

    It is the fingerprint ``ssh-keygen -lf auth.pub`` prints, so a site and the
    coordinator can compare it with tools they already have.
    """
    text = public_line.decode() if isinstance(public_line, bytes) else public_line
    parts = text.split()
    if len(parts) < 2:
        raise CertError("not an OpenSSH public key line")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise CertError("not an OpenSSH public key line") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def generate_site_auth_keys(
    site: str, folder: str | os.PathLike[str], *, force: bool = False
) -> SiteAuthKeys:
    """A site's SuperNode authentication key pair (ECDSA P-384, OpenSSH formats).

    The private key goes to ``flower-supernode --auth-supernode-private-key`` and stays
    at the site; the public key goes to the coordinator, who registers it with
    ``flwr supernode register``.
    """
    check_site_name(site)
    out = Path(folder)
    private_path, public_path = out / AUTH_PRIVATE, out / AUTH_PUBLIC
    _refuse_existing([private_path, public_path], force)
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = public + f" fedsynth-site-{site}\n".encode()
    _write_private(private_path, private, force=force)
    _write_private(public_path, line, force=force)
    return SiteAuthKeys(site, private_path, public_path, ssh_fingerprint(line))


def _name(common_name: str, study: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"fedsynth study {study}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, study: str, days: int, now: dt.datetime
) -> x509.Certificate:
    name = _name(f"fedsynth CA {study}"[:64], study)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: this CA signs the SuperLink's certificate and no other CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    study: str,
    days: int,
    now: dt.datetime,
) -> x509.Certificate:
    public = key.public_key()
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0], study))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def create_study_certs(
    folder: str | os.PathLike[str],
    *,
    study: str = "fedsynth-study",
    hosts: Sequence[str] = DEFAULT_HOSTS,
    sites: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> StudyCerts:
    """The study CA, the SuperLink's TLS key and certificate, and optional site keys.

    Layout under ``folder``: ``ca/ca.key`` and ``ca/ca.crt``; ``coordinator/superlink.key``
    and ``coordinator/superlink.crt``; ``sites/<name>/auth.key`` and ``auth.pub``.
    """
    if not 1 <= days <= MAX_DAYS:
        raise CertError(f"--days must be from 1 to {MAX_DAYS} (ten years), got {days}")
    if not _STUDY_ID.fullmatch(study):
        raise CertError(
            f"study id {study!r} is not usable: use 1 to 128 letters, digits, '.', '_', "
            "':' or '-', starting with a letter or digit (the id `fedsynth keys` uses)")
    hosts = tuple(dict.fromkeys(h.strip() for h in hosts if h.strip()))
    if not hosts:
        raise CertError("give at least one --host the sites use to reach the SuperLink")
    for host in hosts:  # every name is checked before anything is written
        _general_name(host)
    sites = [check_site_name(s) for s in sites]
    if len(set(sites)) != len(sites):
        raise CertError("a site name was given twice")
    out = Path(folder)
    ca_key_path, ca_cert_path = out / CA_DIR / CA_KEY, out / CA_DIR / CA_CERT
    key_path = out / COORDINATOR_DIR / SERVER_KEY
    cert_path = out / COORDINATOR_DIR / SERVER_CERT
    site_paths = [
        out / SITES_DIR / s / name for s in sites for name in (AUTH_PRIVATE, AUTH_PUBLIC)
    ]
    _refuse_existing([ca_key_path, ca_cert_path, key_path, cert_path, *site_paths], force)

    now = dt.datetime.now(dt.UTC)
    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, study, days * 2, now)
    server_key = _new_key()
    server_cert = _server_certificate(server_key, ca_key, ca_cert, hosts, study, days, now)
    _ensure_dir(out)
    _write_private(ca_key_path, _pem_private(ca_key), force=force)
    _write_private(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), force=force)
    _write_private(key_path, _pem_private(server_key), force=force)
    _write_private(
        cert_path, server_cert.public_bytes(serialization.Encoding.PEM), force=force
    )
    site_keys = {
        s: generate_site_auth_keys(s, out / SITES_DIR / s, force=force) for s in sites
    }
    return StudyCerts(out, ca_key_path, ca_cert_path, key_path, cert_path, hosts, site_keys)


# --------------------------------------------------------------------------- checks


def load_auth_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """A SuperNode private key as ``flower-supernode`` will read it, with a clear error."""
    p = Path(path)
    data = _read(p, "SuperNode private key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CertError(
            f"{p} is not an unencrypted OpenSSH private key; flower-supernode reads only "
            "that format (make one with `fedsynth certs site`)"
        ) from None
    except Exception as exc:  # UnsupportedAlgorithm and friends
        raise CertError(f"{p} cannot be read as a private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{p} is not an elliptic-curve key; Flower accepts only ECDSA keys")
    return key


def load_auth_public_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    """A site's public key as ``flwr supernode register`` will read it."""
    p = Path(path)
    data = _read(p, "SuperNode public key")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError):
        raise CertError(f"{p} is not an OpenSSH public key line") from None
    except Exception as exc:
        raise CertError(f"{p} cannot be read as a public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise CertError(f"{p} is not an ECDSA key on a NIST curve, which Flower requires")
    return key


def load_ca_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """The study CA certificate, checked to be a CA and currently valid."""
    p = Path(path)
    data = _read(p, "CA certificate")
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertError(f"{p} is not a PEM certificate") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"{p} is not a CA certificate; use the study's ca.crt")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertError(
            f"{p} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}); ask the coordinator for the current one"
        )
    return cert


# --------------------------------------------------------------------------- CLI


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message} (see --help)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedsynth certs",
        description=(
            "TLS certificates and SuperNode authentication keys for a deployed study. "
            "The coordinator runs `study`; each site runs `site` and sends its public key. "
            "No command prints secret material."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    study = sub.add_parser(
        "study",
        help="(coordinator) the study CA and the SuperLink's TLS key and certificate",
        description=(
            "Create the study CA and the SuperLink certificate signed by it. With --site, "
            "also make site key pairs here (pilots and tests only: in a real study each "
            "site makes its own with `fedsynth certs site`)."
        ),
    )
    study.add_argument("--out", required=True, type=Path, help="folder for the files")
    study.add_argument("--study-id", default="fedsynth-study", help="named in the certificates")
    study.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a host name or IP address the sites use to reach the SuperLink "
        f"(repeatable; default: {', '.join(DEFAULT_HOSTS)})",
    )
    study.add_argument(
        "--site",
        dest="sites",
        action="append",
        default=[],
        metavar="NAME",
        help="also make this site's SuperNode key pair here (repeatable)",
    )
    study.add_argument("--days", type=int, default=365, help="validity of the SuperLink cert")
    study.add_argument("--force", action="store_true", help="replace existing files")

    site = sub.add_parser(
        "site",
        help="(site) this site's SuperNode authentication key pair",
        description="Create this site's key pair. Keep auth.key; send auth.pub.",
    )
    site.add_argument("--site", required=True, help="this site's name in the study")
    site.add_argument("--out", required=True, type=Path, help="folder for the key pair")
    site.add_argument("--force", action="store_true", help="replace an existing key pair")
    return parser


def _print_site(keys: SiteAuthKeys, made_here: bool) -> None:
    if made_here:
        where = "made at the coordinator: hand it to the site securely, then delete it here"
    else:
        where = "stays at this site; never send it"
    print(f"  site {keys.site}:")
    print(f"    SECRET   {keys.private_key}  ({where})")
    print(f"    public   {keys.public_key}  (the coordinator registers it)")
    print(f"    fingerprint {keys.fingerprint}")


def _cmd_study(args: argparse.Namespace) -> None:
    result = create_study_certs(
        args.out,
        study=args.study_id,
        hosts=args.hosts or DEFAULT_HOSTS,
        sites=args.sites,
        days=args.days,
        force=args.force,
    )
    print(f"Study {args.study_id!r}: CA and SuperLink certificate for {', '.join(result.hosts)}")
    print("Coordinator:")
    print(f"  SECRET   {result.ca_key}  (signs certificates; keep offline if you can)")
    print(f"  SECRET   {result.server_key}  (flower-superlink --ssl-keyfile)")
    print(f"  public   {result.server_cert}  (flower-superlink --ssl-certfile)")
    print(f"  public   {result.ca_cert}  (--ssl-ca-certfile; send it to every site)")
    print("Every site: keep a copy of ca.crt and pass it to flower-supernode "
          "--root-certificates.")
    for keys in result.sites.values():
        _print_site(keys, made_here=True)
    if result.sites:
        print("Register each public key once the SuperLink runs: "
              "flwr supernode register <auth.pub> <connection>")


def _cmd_site(args: argparse.Namespace) -> None:
    keys = generate_site_auth_keys(args.site, args.out, force=args.force)
    print(f"SuperNode key pair of site {args.site!r}:")
    _print_site(keys, made_here=False)
    print("Send auth.pub to the coordinator and read the fingerprint to them over a "
          "second channel (phone, video call) so a swapped key is noticed.")


def certs_command(argv: Sequence[str]) -> int:
    """``fedsynth certs ...``: 0 on success, 2 on a usage error, 1 on a file problem."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(argv))
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    handlers = {"study": _cmd_study, "site": _cmd_site}
    try:
        handlers[args.command](args)
    except CertError as exc:
        print(f"fedsynth certs {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(certs_command(sys.argv[1:]))
