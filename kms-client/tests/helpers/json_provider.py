#!/usr/bin/env python3
"""A kms exec helper: keys in a JSON file, spoken to in protocol v1 on stdin/stdout.

Usage: json_provider.py STORE.json

Written for the tests of the exec provider, and as an example of a provider in another
language: every write goes to a temporary file (mode 0600) that is fsynced and renamed over the
store, so a key is durable before it is acknowledged. Keys never go to stderr.

NOT FOR PRODUCTION: the keys are kept in the clear (base64) in the JSON file, wrapped by
nothing. A real helper would wrap them under a KEK it fetches from somewhere else.

Test hooks (environment): KMS_HELPER_CRASH_ON=<key id> makes the helper exit abruptly when
asked for that id.
"""
import base64
import json
import os
import re
import sys
import time

ID = re.compile(r"^(?!/)(?!.*(^|/)\.{1,2}(/|$))(?!.*//)(?!.*/$)[A-Za-z0-9._:/-]{1,255}$")
BITS = {"128": 16, "192": 24, "256": 32}


def load(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save(path, keys):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(keys, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def key_answer(entry):
    version, material = entry[-1]
    return "OK %d %s" % (version, material)


def answer(keys, path, words):
    verb, args = words[0], words[1:]
    if verb == "PING" and not args:
        return "OK PONG"
    if verb == "STATS" and not args:
        return "OK keys=%d" % len(keys)
    if verb == "LIST" and len(args) <= 1:
        prefix = args[0] if args else ""
        ids = sorted(k for k in keys if k.startswith(prefix))
        lines = ["OK %d" % len(ids)]
        for k in ids:
            version, material = keys[k][-1]
            bits = len(base64.b64decode(material)) * 8
            lines.append("%s %d %d %d" % (k, version, bits, int(time.time())))
        return "\n".join(lines)
    if not args or not ID.match(args[0]):
        return "ERR invalid-input bad request"
    key_id = args[0]
    if os.environ.get("KMS_HELPER_CRASH_ON") == key_id:
        os._exit(70)
    length = BITS.get(args[1] if len(args) > 1 else "256")
    if verb == "GET" and len(args) == 1:
        if key_id not in keys:
            return 'ERR not-found key "%s" not found' % key_id
        return key_answer(keys[key_id])
    if verb in ("CREATE", "GET-OR-CREATE") and len(args) <= 2 and length:
        if key_id in keys:
            if verb == "CREATE":
                return 'ERR already-exists key "%s" already exists' % key_id
            return key_answer(keys[key_id])
        keys[key_id] = [[1, base64.b64encode(os.urandom(length)).decode()]]
        save(path, keys)
        return key_answer(keys[key_id])
    if verb == "DELETE" and len(args) == 1:
        if key_id not in keys:
            return 'ERR not-found key "%s" not found' % key_id
        del keys[key_id]
        save(path, keys)
        return "OK"
    if verb == "ROTATE" and len(args) <= 2 and length:
        if key_id not in keys:
            return 'ERR not-found key "%s" not found' % key_id
        keys[key_id].append([keys[key_id][-1][0] + 1, base64.b64encode(os.urandom(length)).decode()])
        save(path, keys)
        return key_answer(keys[key_id])
    if verb == "GET-VERSION" and len(args) == 2:
        for version, material in keys.get(key_id, []):
            if str(version) == args[1]:
                return "OK %d %s" % (version, material)
        return 'ERR not-found key "%s" has no version %s' % (key_id, args[1])
    return "ERR invalid-input unknown request"


def main():
    path = sys.argv[1]
    keys = load(path)
    out = sys.stdout
    out.write("KMS/1 json helper %s\n" % path)
    out.flush()
    for raw in sys.stdin:
        words = raw.rstrip("\r\n").split(" ")
        out.write(answer(keys, path, words) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
