"""The KV socket's mutual challenge: both ends prove they hold the deployment secret.

Before any other message on a new connection to a KVSource:
  P -> D  {"challenge": c1}
  D -> P  {"answer": MAC(c1, "puller"), "challenge": c2}
  P -> D  {"answer": MAC(c2, "source")}
P closes the connection on a wrong answer, having served nothing (not even `ping`); D
refuses a source that cannot answer (a fake one, named in no signed hand-off, or an old
process on a reused port) with TransferError, and prefills locally. The secret never
travels: each side sends a MAC of the other's fresh nonce (security.challenge_answer).
"""

from __future__ import annotations

import socket

from pdserve.security import (
    DeploymentSecret,
    capability_matches,
    challenge_answer,
    new_challenge,
)
from pdserve.transfer.protocol import TransferError
from pdserve.transfer.wire import recv_msg, send_msg

HANDSHAKE_TIMEOUT_S = 10.0  # P drops a peer that does not answer within this
MAX_HANDSHAKE_BYTES = 1024  # a handshake message is ~150 bytes: nothing bigger is read
MAX_CHALLENGE_CHARS = 128


def prove_source(sock: socket.socket, secret: DeploymentSecret) -> bool:
    """P's side: True once D answered P's challenge and P answered D's; False (close the
    connection) on a wrong answer. OSError/ValueError if D went away or sent garbage."""
    mine = new_challenge()
    send_msg(sock, {"challenge": mine})
    reply = recv_msg(sock, MAX_HANDSHAKE_BYTES)
    if reply is None:
        return False
    theirs = reply.get("challenge")
    if not capability_matches(challenge_answer(secret, mine, "puller"), reply.get("answer")):
        return False
    if not isinstance(theirs, str) or not 0 < len(theirs) <= MAX_CHALLENGE_CHARS:
        return False
    send_msg(sock, {"answer": challenge_answer(secret, theirs, "source")})
    return True


def prove_puller(sock: socket.socket, secret: DeploymentSecret, where: str) -> None:
    """D's side, on a connected socket whose timeout bounds each step; TransferError unless
    the source proved it holds the secret."""
    try:
        hello = recv_msg(sock, MAX_HANDSHAKE_BYTES)
        theirs = None if hello is None else hello.get("challenge")
        if not isinstance(theirs, str) or not 0 < len(theirs) <= MAX_CHALLENGE_CHARS:
            raise TransferError(f"KV source {where} sent no challenge: not a pdserve source "
                                "of this deployment")
        mine = new_challenge()
        send_msg(sock, {"answer": challenge_answer(secret, theirs, "puller"), "challenge": mine})
        reply = recv_msg(sock, MAX_HANDSHAKE_BYTES)
    except (OSError, ValueError) as e:
        raise TransferError(f"KV source {where}: handshake failed: {e}") from e
    answer = None if reply is None else reply.get("answer")
    if not capability_matches(challenge_answer(secret, mine, "source"), answer):
        raise TransferError(f"KV source {where} did not prove it holds the deployment secret")
