# exec-sandbox Python driver, run as `python3 -u -c <this file>` by the guest agent.
#
# Protocol: the agent writes commands on fd 3:
#   "<nonce> <env_len> <code_len>\n" <env block: "NAME=VALUE\n"...> <code (UTF-8)>
# and the driver answers each on fd 4 with "<nonce> <exit code>\n" (plus "ready\n" once at start).
# An empty command (no env, no code) is the agent's barrier after a status line: it is answered
# "<nonce> 0" from the loop, so its answer proves the driver is back at its command read.
# User code runs in __main__'s namespace, so state persists from one command to the next.
def _sbx_driver():
    import os
    import sys

    cmd_fd, status_fd = 3, 4
    # User code's children must not inherit the control pipes.
    os.set_inheritable(cmd_fd, False)
    os.set_inheritable(status_fd, False)
    namespace = sys.modules["__main__"].__dict__
    namespace.pop("_sbx_driver", None)
    pending = bytearray()

    def read_exact(n):
        while len(pending) < n:
            chunk = os.read(cmd_fd, max(65536, n - len(pending)))
            if not chunk:
                raise EOFError
            pending.extend(chunk)
        data = bytes(pending[:n])
        del pending[:n]
        return data

    def read_header():
        while b"\n" not in pending:
            if len(pending) > 4096:
                raise ValueError("command header too long")
            chunk = os.read(cmd_fd, 65536)
            if not chunk:
                raise EOFError
            pending.extend(chunk)
        end = pending.index(b"\n")
        header = bytes(pending[:end]).decode("ascii")
        del pending[: end + 1]
        nonce, env_len, code_len = header.split(" ")
        return nonce, int(env_len), int(code_len)

    def flush():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:
                pass

    last_code = [""]
    # The agent's reseed after a memory snapshot's restore (`reseed.rs`, checked by a test),
    # compiled here, in the template: under emulation a clone's first compile translates the
    # whole compiler afresh, and the reseed should not pay for more of it than the user's code
    # will use.
    reseed = "[m.seed() for m in map(__import__('sys').modules.get, ('random', 'numpy.random')) if m is not None]"
    reseed_compiled = compile(reseed, "<sandbox>", "exec")

    def print_error(exc, tb):
        try:
            # Imported on first use: traceback costs ~0.3 s of start-up under emulation.
            import linecache
            import traceback

            code = last_code[0]
            linecache.cache["<sandbox>"] = (len(code), None, code.splitlines(True), "<sandbox>")
            traceback.print_exception(type(exc), exc, tb)
        except BaseException:
            try:
                os.write(2, ("%s: %s\n" % (type(exc).__name__, exc)).encode("utf-8", "replace"))
            except BaseException:
                pass

    def exit_code(exc):
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        try:
            print(code, file=sys.stderr)
        except BaseException:
            pass
        return 1

    def run(code):
        last_code[0] = code
        try:
            compiled = reseed_compiled if code == reseed else compile(code, "<sandbox>", "exec")
        except BaseException as exc:
            # SyntaxError and friends: no frames of ours in the report.
            print_error(exc, None)
            return 1
        try:
            exec(compiled, namespace)
        except SystemExit as exc:
            return exit_code(exc)
        except BaseException as exc:
            # Drop this frame: the traceback starts in the user's code.
            print_error(exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
            return 1
        return 0

    def parse_env(block):
        pairs = []
        for line in block.split("\n"):
            name, sep, value = line.partition("=")
            if sep:
                pairs.append((name, value))
        return pairs

    def apply_env(pairs):
        saved = []
        for name, value in pairs:
            saved.append((name, os.environ.get(name)))
            os.environ[name] = value
        return saved

    # The interpreter reads PYTHONINTMAXSTRDIGITS only at start (the agent starts it with 0: no
    # limit); a value passed with one execution applies to that execution, as it would to a
    # fresh `python3`. None: this Python has no such limit (before 3.11).
    get_digits = getattr(sys, "get_int_max_str_digits", None)
    set_digits = getattr(sys, "set_int_max_str_digits", None)

    def apply_digits(pairs):
        """Returns the limit to restore afterwards, or None; raises ValueError if invalid."""
        value = dict(pairs).get("PYTHONINTMAXSTRDIGITS")
        if value is None or set_digits is None:
            return None
        previous = get_digits()
        try:
            digits = int(value)
            if digits < 0:
                raise ValueError
            set_digits(digits)
        except ValueError:
            raise ValueError(
                "PYTHONINTMAXSTRDIGITS: invalid limit; must be >= 640 or 0 for unlimited."
            ) from None
        return previous

    def restore_env(saved):
        for name, value in reversed(saved):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    # Pay for the compile-and-run path now rather than in the first execution.
    exec(compile("pass", "<sandbox>", "exec"), {})
    os.write(status_fd, b"ready\n")
    while True:
        try:
            nonce, env_len, code_len = read_header()
            env_block = read_exact(env_len).decode("utf-8")
            code = read_exact(code_len).decode("utf-8")
        except EOFError:
            os._exit(0)
        if not env_len and not code_len:
            # The agent's barrier: answered from the loop, nothing run.
            os.write(status_fd, ("%s 0\n" % nonce).encode("ascii"))
            continue
        status = 1
        saved = []
        digits = None
        try:
            pairs = parse_env(env_block)
            saved = apply_env(pairs)
            try:
                digits = apply_digits(pairs)
            except ValueError as exc:
                # What python3 says when started with such a value; the code does not run.
                os.write(2, ("%s\n" % exc).encode("utf-8", "replace"))
            else:
                status = run(code)
        except BaseException as exc:
            print_error(exc, None)
        finally:
            flush()
            try:
                restore_env(saved)
                if digits is not None:
                    set_digits(digits)
            except BaseException:
                pass
        os.write(status_fd, ("%s %d\n" % (nonce, status)).encode("ascii"))


_sbx_driver()
