// exec-sandbox JavaScript/TypeScript driver, run by the guest agent as `bun <this file>`.
//
// Commands arrive on fd 3: "<nonce> <env_len> <code_len>\n" <env: "NAME=VALUE\n"...> <code>.
// Each is answered on fd 4 with "<nonce> <exit code>\n" ("ready\n" once at start).
//
// Code is transpiled by Bun in REPL mode (TypeScript syntax, top-level await, top-level
// declarations hoisted to globals) and evaluated in the global scope, so state persists from one
// command to the next. Code that only works as a module (`export`) runs as a module instead.
// An execution ends when its code has settled and the timers it started have fired or been
// cleared, like a script whose event loop drains; `process.exit(n)` ends the execution with n
// without ending the driver.
import {
  closeSync,
  mkdirSync,
  openSync,
  readSync,
  unlinkSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";

const CMD_FD = 3;
const STATUS_FD = 4;
const SOURCE_URL = "<sandbox>";
const DRIVER_PATH = import.meta.path;
const transpiler = new Bun.Transpiler({ loader: "ts", replMode: true });
const decoder = new TextDecoder();
const realExit = process.exit.bind(process);

// Math.random: xoshiro128** seeded from the kernel CRNG, 53 bits per double like
// JavaScriptCore's own (and, like it, not a cryptographic generator). JavaScriptCore seeds its
// generator once per global object and cannot reseed it, so every clone of a memory snapshot
// would share its sequence; this one the agent reseeds after each restore by calling the
// function under the global symbol below (see reseed.rs). The seed is read from /dev/urandom,
// never from `crypto.getRandomValues`: that is a generator in this process, seeded on first
// use, and a template that used it would hand every clone the same state.
{
  const s = new Uint32Array(4);
  const reseed = () => {
    const fd = openSync("/dev/urandom", "r");
    try {
      if (readSync(fd, new Uint8Array(s.buffer), 0, 16, null) !== 16) {
        throw new Error("short read from /dev/urandom");
      }
    } finally {
      closeSync(fd);
    }
  };
  reseed();
  const rotl = (x, k) => (x << k) | (x >>> (32 - k));
  const next = () => {
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  };
  Object.defineProperty(Math, "random", {
    value: function random() {
      return ((next() >>> 5) * 67108864 + (next() >>> 6)) / 9007199254740992;
    },
    writable: true,
    configurable: true,
    enumerable: false,
  });
  // Fixed: user code in a session cannot swap what the next restore would call (templates
  // never run user code; this holds anyway).
  Object.defineProperty(globalThis, Symbol.for("exec-sandbox.reseed"), {
    value: reseed,
    writable: false,
    configurable: false,
    enumerable: false,
  });
}

/** The execution in progress: `finish(code)` ends it. */
let current = null;

class ExitRequest {
  constructor(code) {
    this.code = code;
    this.message = `process.exit(${code ?? ""}) called`;
  }
}

function exitCodeOf(code) {
  const value = code === undefined || code === null ? (process.exitCode ?? 0) : code;
  const n = Number(value);
  return Number.isInteger(n) ? n & 0xff : 1;
}

process.exit = function exit(code) {
  if (current) throw new ExitRequest(code);
  realExit(code);
};

function writeErr(text) {
  try {
    process.stderr.write(text);
  } catch {
    // Nothing left to report to.
  }
}

function cleanStack(stack) {
  const kept = [];
  for (const line of stack.split("\n")) {
    if (/^\s+at /.test(line) && (line.includes(DRIVER_PATH) || line.includes("(unknown)"))) {
      continue;
    }
    kept.push(line);
  }
  return kept.join("\n");
}

function report(error) {
  let text;
  try {
    if (error instanceof Error || (error && typeof error.stack === "string")) {
      text = cleanStack(String(error.stack));
      if (!text.includes(String(error.message ?? ""))) text = `${error.name}: ${error.message}\n${text}`;
    } else {
      text = `Uncaught ${Bun.inspect(error)}`;
    }
  } catch {
    text = "Uncaught exception";
  }
  writeErr(text.endsWith("\n") ? text : `${text}\n`);
}

function reportBuildError(error) {
  const messages = Array.isArray(error?.errors) ? error.errors : [error];
  for (const m of messages) {
    const p = m?.position;
    let text = "";
    if (p) {
      text += `${SOURCE_URL}:${p.line}:${p.column}\n${p.lineText}\n`;
      text += `${" ".repeat(Math.max(0, p.column - 1))}^\n`;
    }
    writeErr(`${text}SyntaxError: ${m?.message ?? String(m)}\n`);
  }
}

process.on("uncaughtException", (error) => {
  if (error instanceof ExitRequest) {
    if (current) current.finish(exitCodeOf(error.code));
    return;
  }
  report(error);
  if (current) current.finish(1);
});
process.on("unhandledRejection", (error) => {
  if (error instanceof ExitRequest) {
    if (current) current.finish(exitCodeOf(error.code));
    return;
  }
  report(error);
  if (current) current.finish(1);
});

// Timers started by the running execution; it ends when none is left.
const pending = new Set();
let wake = null;

function untrack(timer) {
  if (pending.delete(timer) && pending.size === 0 && wake) {
    const w = wake;
    wake = null;
    w();
  }
}

function track(timer) {
  if (!current || timer === null || typeof timer !== "object") return timer;
  pending.add(timer);
  if (typeof timer.unref === "function") {
    const unref = timer.unref;
    timer.unref = function () {
      untrack(timer);
      return unref.call(this);
    };
  }
  return timer;
}

function untrackId(id) {
  if (typeof id === "object") return untrack(id);
  for (const t of pending) {
    if (Number(t) === id) return untrack(t);
  }
}

const native = {
  setTimeout: globalThis.setTimeout,
  clearTimeout: globalThis.clearTimeout,
  setInterval: globalThis.setInterval,
  clearInterval: globalThis.clearInterval,
  setImmediate: globalThis.setImmediate,
  clearImmediate: globalThis.clearImmediate,
};

function once(create) {
  return function (fn, ...rest) {
    if (typeof fn !== "function") return create(fn, ...rest);
    let timer = null;
    timer = create(function (...args) {
      try {
        return fn.apply(this, args);
      } finally {
        untrack(timer);
      }
    }, ...rest);
    return track(timer);
  };
}

globalThis.setTimeout = Object.assign(once(native.setTimeout), native.setTimeout);
globalThis.setImmediate = Object.assign(once(native.setImmediate), native.setImmediate);
globalThis.setInterval = Object.assign(function setInterval(fn, ...rest) {
  return track(native.setInterval(fn, ...rest));
}, native.setInterval);
globalThis.clearTimeout = function clearTimeout(t) {
  untrackId(t);
  return native.clearTimeout(t);
};
globalThis.clearInterval = function clearInterval(t) {
  untrackId(t);
  return native.clearInterval(t);
};
globalThis.clearImmediate = function clearImmediate(t) {
  untrackId(t);
  return native.clearImmediate(t);
};

// `require` in user code, as in Node's REPL: a global resolving from the working directory at
// call time (a module's `require` is its own; indirect eval sees only globals). Package layers
// are found through NODE_PATH, which Bun's resolver honours.
function requireHere() {
  return createRequire(join(process.cwd(), SOURCE_URL));
}
const userRequire = function require(id) {
  return requireHere()(id);
};
userRequire.resolve = (id, options) => requireHere().resolve(id, options);
globalThis.require = userRequire;

// Specifiers in user code resolve from the working directory, not from this file.
function resolveFromCwd(js, code) {
  // No specifier without either word: skip the second parse (under TCG, a restored clone's
  // first execution would translate the import scanner's code too).
  if (!code.includes("import") && !code.includes("require")) return js;
  let imports;
  try {
    imports = transpiler.scanImports(code);
  } catch {
    return js;
  }
  const cwd = process.cwd();
  const seen = new Set();
  for (const { path } of imports) {
    if (!path || seen.has(path) || path.startsWith("node:") || path.startsWith("bun:")) continue;
    seen.add(path);
    let resolved;
    try {
      resolved = Bun.resolveSync(path, cwd);
    } catch {
      continue;
    }
    if (typeof resolved !== "string" || !resolved.startsWith("/") || resolved === path) continue;
    const from = JSON.stringify(path);
    const to = JSON.stringify(resolved);
    js = js
      .split(`import(${from})`)
      .join(`import(${to})`)
      .split(`require(${from})`)
      .join(`require(${to})`);
  }
  return js;
}

function parses(js) {
  try {
    new Function(js);
    return true;
  } catch {
    return false;
  }
}

let moduleDir = null;
let moduleCount = 0;

async function evaluateAsModule(code) {
  if (moduleDir === null) {
    moduleDir = join(tmpdir(), `.sbx-js-${process.pid}`);
    mkdirSync(moduleDir, { recursive: true, mode: 0o700 });
  }
  moduleCount += 1;
  const path = join(moduleDir, `cmd-${moduleCount}.ts`);
  writeFileSync(path, code, { mode: 0o600 });
  try {
    await import(path);
  } finally {
    try {
      unlinkSync(path);
    } catch {
      // Already gone.
    }
  }
}

/** Runs `code`; returns false when it could not be compiled (the error is already reported). */
async function evaluate(code) {
  let js;
  try {
    js = transpiler.transformSync(code);
  } catch (error) {
    reportBuildError(error);
    return false;
  }
  js = `${resolveFromCwd(js, code)}\n//# sourceURL=${SOURCE_URL}`;
  let completion;
  try {
    completion = (0, eval)(js);
  } catch (error) {
    // A parse failure of the REPL form (e.g. `export`) means the code is a module.
    if (error instanceof SyntaxError && !parses(js)) {
      await evaluateAsModule(code);
      return true;
    }
    throw error;
  }
  await completion;
  return true;
}

function applyEnv(block) {
  const saved = [];
  for (const line of block.split("\n")) {
    const eq = line.indexOf("=");
    if (eq <= 0) continue;
    const name = line.slice(0, eq);
    saved.push([name, Object.hasOwn(process.env, name) ? process.env[name] : undefined]);
    process.env[name] = line.slice(eq + 1);
  }
  return saved;
}

function restoreEnv(saved) {
  for (const [name, value] of saved.reverse()) {
    if (value === undefined) delete process.env[name];
    else process.env[name] = value;
  }
}

async function execute(envBlock, code) {
  const saved = applyEnv(envBlock);
  process.exitCode = 0;
  pending.clear();
  let finish;
  const finished = new Promise((resolve) => {
    finish = resolve;
  });
  current = { finish };
  (async () => {
    try {
      if (!(await evaluate(code))) return finish(1);
      while (pending.size > 0) {
        await new Promise((resolve) => {
          wake = resolve;
        });
      }
      // One more turn of the event loop, so that rejections nobody handled are reported.
      await new Promise((resolve) => native.setImmediate(resolve));
      finish(exitCodeOf(undefined));
    } catch (error) {
      if (error instanceof ExitRequest) return finish(exitCodeOf(error.code));
      report(error);
      finish(1);
    }
  })();
  const status = await finished;
  current = null;
  wake = null;
  pending.clear();
  restoreEnv(saved);
  return status;
}

// Command channel.
const reader = Bun.file(CMD_FD).stream().getReader();
let buffered = new Uint8Array(0);

async function fill() {
  const { value, done } = await reader.read();
  if (done) return false;
  const merged = new Uint8Array(buffered.length + value.length);
  merged.set(buffered);
  merged.set(value, buffered.length);
  buffered = merged;
  return true;
}

async function readHeader() {
  for (;;) {
    const end = buffered.indexOf(10);
    if (end >= 0) {
      const line = decoder.decode(buffered.subarray(0, end));
      buffered = buffered.subarray(end + 1);
      return line;
    }
    if (buffered.length > 4096 || !(await fill())) return null;
  }
}

async function readExact(n) {
  if (!Number.isSafeInteger(n) || n < 0) return null;
  while (buffered.length < n) {
    if (!(await fill())) return null;
  }
  const data = buffered.subarray(0, n);
  buffered = buffered.subarray(n);
  return data;
}

// Pay for the transpile-and-evaluate path now rather than in the first execution.
(0, eval)(transpiler.transformSync("const __sbxWarm: number = 1; __sbxWarm;"));
delete globalThis.__sbxWarm;
writeSync(STATUS_FD, "ready\n");
for (;;) {
  const header = await readHeader();
  if (header === null) realExit(0);
  const [nonce, envLen, codeLen] = header.split(" ");
  const envBlock = await readExact(Number(envLen));
  const code = await readExact(Number(codeLen));
  if (envBlock === null || code === null) realExit(0);
  // An empty command is the agent's barrier: answered from the loop, nothing evaluated.
  const status =
    envBlock.length === 0 && code.length === 0
      ? 0
      : await execute(decoder.decode(envBlock), decoder.decode(code));
  writeSync(STATUS_FD, `${nonce} ${status}\n`);
}
