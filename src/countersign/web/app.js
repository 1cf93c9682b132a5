// The Countersign console: login, sessions, chat with streamed replies, approval cards, the
// approvals inbox, agents and API keys. Every change goes through the public API.

import { html, render, useCallback, useEffect, useMemo, useRef, useState } from "./vendor/htm-preact.js";
import { ApiError, api, csrfToken, newKey, onUnauthenticated, readEvents } from "./api.js";
import { Markdown } from "./markdown.js";

// --- small helpers -----------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const time = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const pretty = (value) => JSON.stringify(value, null, 2);

function errorText(error) {
  if (error instanceof ApiError) return error.message;
  return "The server cannot be reached.";
}

function useTick(ms) {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(timer);
  }, [ms]);
  return now;
}

function timeLeft(expiresAt, now) {
  const seconds = Math.max(0, Math.round((new Date(expiresAt).getTime() - now) / 1000));
  if (seconds <= 0) return "expired";
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  return h ? `${h} h ${m} min left` : m ? `${m} min ${s} s left` : `${s} s left`;
}

function draftKey(sessionId) {
  return `countersign-draft-${sessionId}`;
}

// --- the per-user live feed (GET /me/events), one per tab --------------------------------

const feedListeners = new Set();
let feedController = null;

function startFeed(onState) {
  stopFeed();
  const controller = new AbortController();
  feedController = controller;
  (async () => {
    let delay = 500;
    while (!controller.signal.aborted) {
      try {
        for await (const message of readEvents("/me/events", {
          signal: controller.signal,
          onOpen: () => {
            delay = 500;
            onState("live");
            for (const fn of feedListeners) fn({ event: "feed.opened", data: {} });
          },
        })) {
          for (const fn of feedListeners) fn(message);
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof ApiError && error.status === 401) return;
      }
      onState("reconnecting");
      await sleep(delay);
      delay = Math.min(delay * 2, 10_000);
    }
  })();
}

function stopFeed() {
  if (feedController) feedController.abort();
  feedController = null;
}

function useFeed(fn) {
  const ref = useRef(fn);
  ref.current = fn;
  useEffect(() => {
    const listener = (message) => ref.current(message);
    feedListeners.add(listener);
    return () => feedListeners.delete(listener);
  }, []);
}

// --- the app -------------------------------------------------------------------------------

function App() {
  const [me, setMe] = useState(undefined); // undefined: not known yet; null: logged out
  const [view, setView] = useState(() => viewFromHash());
  const [feedState, setFeedState] = useState("connecting");

  useEffect(() => {
    // Without the CSRF cookie there is no login to ask about (and no 401 to log).
    if (!csrfToken()) setMe(null);
    else api("GET", "/me", undefined, { quiet401: true }).then(setMe, () => setMe(null));
    onUnauthenticated(() => {
      stopFeed();
      setMe(null);
    });
    const onHash = () => setView(viewFromHash());
    window.addEventListener("hashchange", onHash);
    return () => window.removeEventListener("hashchange", onHash);
  }, []);

  useEffect(() => {
    if (me) startFeed(setFeedState);
    return stopFeed;
  }, [me]);

  if (me === undefined) return html`<p class="loading">Loading…</p>`;
  if (me === null) return html`<${Login} onLoggedIn=${setMe} />`;
  return html`
    <${Header} me=${me} onLoggedOut=${() => setMe(null)} feedState=${feedState} />
    <main id="main">
      ${view.name === "approvals" && html`<${Inbox} me=${me} />`}
      ${view.name === "agents" && html`<${Agents} />`}
      ${view.name === "keys" && html`<${ApiKeys} />`}
      ${view.name === "sessions" && html`<${Sessions} me=${me} selected=${view.id} />`}
    </main>`;
}

function viewFromHash() {
  const hash = window.location.hash.replace(/^#\/?/, "");
  const [name, id] = hash.split("/");
  if (["approvals", "agents", "keys"].includes(name)) return { name };
  const valid = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(id || "");
  return { name: "sessions", id: name === "sessions" && valid ? id : null };
}

function go(path) {
  window.location.hash = `#/${path}`;
}

// --- login -----------------------------------------------------------------------------------

function Login({ onLoggedIn }) {
  const [email, setEmail] = useState("");
  const [password, setPassword] = useState("");
  const [error, setError] = useState(null);
  const [notice, setNotice] = useState(null);
  const [providers, setProviders] = useState({ items: [], registration_open: false });
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    api("GET", "/auth/providers").then(setProviders, () => {});
  }, []);

  const logIn = async (event) => {
    event?.preventDefault();
    setBusy(true);
    setError(null);
    try {
      await api("POST", "/auth/login", { email, password, cookie: true }, { quiet401: true });
      onLoggedIn(await api("GET", "/me"));
    } catch (failure) {
      setError(errorText(failure));
    } finally {
      setBusy(false);
    }
  };
  const register = async () => {
    setBusy(true);
    setError(null);
    try {
      await api("POST", "/auth/register", { email, password });
      setNotice("Account created.");
      await logIn();
    } catch (failure) {
      setError(errorText(failure));
      setBusy(false);
    }
  };
  return html`
    <main id="main" class="login">
      <h1>Countersign</h1>
      <form onSubmit=${logIn} class="card">
        <label>Email<input type="email" autocomplete="username" required value=${email}
          onInput=${(e) => setEmail(e.target.value)} /></label>
        <label>Password<input type="password" autocomplete="current-password" required
          value=${password} onInput=${(e) => setPassword(e.target.value)} /></label>
        ${error && html`<p class="error" role="alert">${error}</p>`}
        ${notice && html`<p class="notice" role="status">${notice}</p>`}
        <div class="row">
          <button type="submit" disabled=${busy}>Log in</button>
          ${providers.registration_open &&
          html`<button type="button" class="secondary" disabled=${busy} onClick=${register}>Register</button>`}
        </div>
        ${providers.items.length > 0 &&
        html`<div class="providers">
          ${providers.items.map(
            (p) => html`<a class="button secondary" href=${p.login_url}>Sign in with ${p.name}</a>`,
          )}
        </div>`}
      </form>
    </main>`;
}

// --- header ----------------------------------------------------------------------------------

function usePendingCount() {
  const [count, setCount] = useState(null);
  const load = useCallback(async () => {
    try {
      const page = await api("GET", "/approvals?status=pending&limit=100");
      setCount(page.next_cursor ? "100+" : String(page.items.length));
    } catch {
      /* shown as unknown */
    }
  }, []);
  useEffect(() => {
    load();
  }, [load]);
  useFeed((message) => {
    if (message.event.startsWith("approval.") || message.event === "feed.opened") load();
  });
  return count;
}

function Header({ me, onLoggedOut, feedState }) {
  const count = usePendingCount();
  const logOut = async () => {
    try {
      await api("POST", "/auth/logout");
    } finally {
      stopFeed();
      onLoggedOut();
    }
  };
  return html`
    <header class="top">
      <a class="brand" href="#/sessions">Countersign</a>
      <nav aria-label="Main">
        <a href="#/sessions">Sessions</a>
        <a href="#/approvals" class="approvals-link">Approvals (${count ?? "…"})</a>
        <a href="#/agents">Agents</a>
        <a href="#/keys">API keys</a>
      </nav>
      <span class="who">${me.email}</span>
      ${feedState === "reconnecting" && html`<span class="badge warn" role="status">Reconnecting…</span>`}
      <button type="button" class="secondary" onClick=${logOut}>Log out</button>
    </header>`;
}

// --- sessions --------------------------------------------------------------------------------

function Sessions({ me, selected }) {
  const [sessions, setSessions] = useState([]);
  const [cursor, setCursor] = useState(null);
  const [query, setQuery] = useState("");
  const [agents, setAgents] = useState([]);
  const [agentId, setAgentId] = useState("");
  const [error, setError] = useState(null);

  const load = useCallback(async (q) => {
    try {
      const page = await api("GET", `/sessions?limit=30${q ? `&q=${encodeURIComponent(q)}` : ""}`);
      setSessions(page.items);
      setCursor(page.next_cursor);
    } catch (failure) {
      setError(errorText(failure));
    }
  }, []);
  useEffect(() => {
    load(query);
  }, [query, load]);
  useEffect(() => {
    api("GET", "/agents?limit=100").then((page) => setAgents(page.items), () => {});
  }, []);
  useFeed((message) => {
    if (["session.changed", "run.status", "feed.opened"].includes(message.event)) load(query);
  });

  const more = async () => {
    const page = await api("GET", `/sessions?limit=30&cursor=${encodeURIComponent(cursor)}${query ? `&q=${encodeURIComponent(query)}` : ""}`);
    setSessions([...sessions, ...page.items]);
    setCursor(page.next_cursor);
  };
  const create = async () => {
    setError(null);
    try {
      const body = agentId ? { agent_id: agentId } : {};
      const session = await api("POST", "/sessions", body, { headers: { "Idempotency-Key": newKey() } });
      await load(query);
      go(`sessions/${session.id}`);
    } catch (failure) {
      setError(errorText(failure));
    }
  };
  const current = sessions.find((s) => s.id === selected) || null;
  return html`
    <div class="layout">
      <aside class="sidebar" aria-label="Sessions">
        <div class="new">
          <label class="inline">Agent
            <select value=${agentId} onChange=${(e) => setAgentId(e.target.value)}>
              <option value="">Default agent</option>
              ${agents.filter((a) => !a.is_default).map((a) => html`<option value=${a.id}>${a.name}</option>`)}
            </select>
          </label>
          <button type="button" onClick=${create}>New session</button>
        </div>
        <label class="inline">Search sessions
          <input type="search" value=${query} onInput=${(e) => setQuery(e.target.value)} /></label>
        ${error && html`<p class="error" role="alert">${error}</p>`}
        <ul class="session-list">
          ${sessions.map(
            (s) => html`<li>
              <a href=${`#/sessions/${s.id}`} aria-current=${s.id === selected ? "page" : undefined}>
                ${s.title || "Untitled"}${s.active_run_id ? html` <span class="dot" title="a run is going">●</span>` : ""}
              </a></li>`,
          )}
        </ul>
        ${cursor && html`<button type="button" class="secondary" onClick=${more}>More sessions</button>`}
      </aside>
      <section class="content">
        ${selected
          ? html`<${Chat} key=${selected} me=${me} sessionId=${selected} summary=${current}
              onChanged=${() => load(query)} />`
          : html`<p class="empty">Choose a session, or start a new one.</p>`}
      </section>
    </div>`;
}

// --- chat ------------------------------------------------------------------------------------

const ENDS = new Set(["run.finished", "run.failed"]);
const HISTORY_PAGE = 50;

function emptyRun(runId) {
  return { runId, status: "queued", deltas: [], tools: [], lastSeq: 0, error: null, connection: "open" };
}

/** The reply text of a run's deltas, leaving out what a retried attempt replaced. */
function replyText(run) {
  return run.deltas.map((d) => d.text).join("");
}

function applyEvent(run, message) {
  const { event, data, id } = message;
  if (id !== null && id <= run.lastSeq) return run; // already seen: never twice
  const next = { ...run, lastSeq: id ?? run.lastSeq };
  if (event === "run.started") {
    next.status = "running";
    const cut = data.resumed_from_seq || 0;
    next.deltas = run.deltas.filter((d) => d.seq <= cut || d.attempt >= data.attempt);
  } else if (event === "text.delta") {
    next.deltas = [...run.deltas, { seq: id, attempt: data.attempt, text: data.text }];
  } else if (event === "tool.call") {
    next.tools = [...run.tools, { callId: data.call_id, tool: data.tool, arguments: data.arguments, at: data.at, output: null }];
  } else if (event === "tool.result") {
    next.tools = run.tools.map((t) =>
      t.callId === data.call_id || (!data.call_id && t.output === null && t.tool === data.tool)
        ? { ...t, output: data.output, duration: (new Date(data.at) - new Date(t.at)) / 1000 }
        : t,
    );
  } else if (event === "approval.required") {
    next.status = "awaiting_approval";
  } else if (event === "approval.resolved") {
    next.status = "queued";
  } else if (event === "run.finished") {
    next.status = data.status || "succeeded";
  } else if (event === "run.failed") {
    next.status = data.status === "cancelled" ? "cancelled" : "failed";
    next.error = next.status === "cancelled" ? null : data.reason;
  }
  return next;
}

function Chat({ me, sessionId, summary, onChanged: changed }) {
  // The list's callback is new on each of its renders: read through a ref, so that a reload
  // of the session list never restarts this chat's streams.
  const changedRef = useRef(changed);
  changedRef.current = changed;
  const onChanged = useCallback(() => changedRef.current(), []);
  const [session, setSession] = useState(summary);
  const [messages, setMessages] = useState([]);
  const [olderCursor, setOlderCursor] = useState(null);
  const [run, setRun] = useState(null);
  const [approvals, setApprovals] = useState([]);
  const [draft, setDraft] = useState(() => sessionStorage.getItem(draftKey(sessionId)) || "");
  const [error, setError] = useState(null);
  const [editingTitle, setEditingTitle] = useState(null);
  const following = useRef(null); // the follower now: {runId, controller}
  const sending = useRef(false);
  const disposed = useRef(false); // the Chat is gone: nothing may start or go on
  const sendController = useRef(null);
  const sendKey = useRef(null); // one Idempotency-Key per draft, until it is sent
  const [sendBusy, setSendBusy] = useState(false);
  const runRef = useRef(null);
  runRef.current = run;

  // The newest page of the history; older pages come on request ("Earlier messages").
  const loadMessages = useCallback(async () => {
    const page = await api("GET", `/sessions/${sessionId}/messages?order=desc&limit=${HISTORY_PAGE}`);
    const newest = page.items.slice().reverse();
    const first = newest.length ? newest[0].seq : Infinity;
    let olderKept = false;
    setMessages((shown) => {
      const older = shown.filter((m) => m.seq !== undefined && m.seq < first);
      // Kept only when the new page joins onto them; after a gap (many messages came while
      // this tab slept) the page starts afresh, and "Earlier messages" pages from it.
      olderKept = older.length > 0 && Math.max(...older.map((m) => m.seq)) >= first - 1;
      return olderKept ? [...older, ...newest] : newest;
    });
    if (!olderKept) setOlderCursor(page.next_cursor);
  }, [sessionId]);

  const loadOlder = async () => {
    const page = document.scrollingElement || document.documentElement;
    const before = page.scrollHeight - page.scrollTop;
    try {
      const answer = await api(
        "GET",
        `/sessions/${sessionId}/messages?order=desc&limit=${HISTORY_PAGE}&cursor=${encodeURIComponent(olderCursor)}`,
      );
      const older = answer.items.slice().reverse();
      setMessages((shown) => [...older.filter((m) => !shown.some((x) => x.id === m.id)), ...shown]);
      setOlderCursor(answer.next_cursor);
      // Keep what was on screen where it was.
      requestAnimationFrame(() => {
        page.scrollTop = page.scrollHeight - before;
      });
    } catch (failure) {
      setError(errorText(failure));
    }
  };

  const approvalsAsked = useRef(0);
  const approvalsShown = useRef([]);
  approvalsShown.current = approvals;
  const loadApprovals = useCallback(async () => {
    const asked = ++approvalsAsked.current;
    const page = await api("GET", `/sessions/${sessionId}/pending-approvals?limit=50`);
    if (asked !== approvalsAsked.current) return; // a newer answer is on its way
    const settled = await settleCards(approvalsShown.current, page);
    if (asked !== approvalsAsked.current) return;
    setApprovals((shown) => mergeApprovals(shown, page.items, !page.next_cursor, settled));
  }, [sessionId]);

  // One follower at a time: a newer one (a new message's stream) supersedes an older one.
  const follow = useCallback(
    async (runId, { start, controller = new AbortController() } = {}) => {
      if (disposed.current) {
        controller.abort();
        return;
      }
      if (!start && following.current?.runId === runId) return;
      const me = { runId, controller };
      following.current?.controller.abort(); // the older follower's stream is closed
      following.current = me;
      const mine = () => following.current === me;
      let current = runRef.current && runRef.current.runId === runId ? runRef.current : emptyRun(runId);
      setRun(current);
      let attempt = 0;
      let opened = start;
      for (;;) {
        try {
          const source = opened
            ? opened
            : readEvents(`/sessions/${sessionId}/runs/${runId}/events`, {
                lastEventId: current.lastSeq || undefined,
                signal: controller.signal,
                onOpen: () => {
                  if (!mine()) return;
                  current = { ...current, connection: "open" };
                  setRun(current);
                },
              });
          opened = null;
          let ended = false;
          for await (const message of source) {
            if (!mine()) return;
            current = { ...applyEvent(current, message), connection: "open" };
            setRun(current);
            attempt = 0;
            if (message.event === "approval.required") loadApprovals();
            if (ENDS.has(message.event)) ended = true;
          }
          if (ended || current.status === "awaiting_approval") break;
          // The stream ended without an end: read again from where it was.
        } catch (failure) {
          if (failure instanceof ApiError && failure.status < 500) {
            setError(errorText(failure));
            break;
          }
        }
        if (!mine()) return;
        attempt += 1;
        current = { ...current, connection: "reconnecting" };
        setRun(current);
        await sleep(Math.min(300 * 2 ** attempt, 5000));
        if (!mine()) return;
      }
      if (!mine() || disposed.current) return;
      following.current = null;
      current = { ...current, connection: "open" };
      setRun(current);
      if (["succeeded", "failed", "cancelled"].includes(current.status)) {
        await loadMessages();
        onChanged();
      }
    },
    [sessionId, loadApprovals, loadMessages, onChanged],
  );

  const refresh = useCallback(async () => {
    try {
      const fresh = await api("GET", `/sessions/${sessionId}`);
      setSession(fresh);
      await loadMessages();
      await loadApprovals();
      if (fresh.active_run_id) follow(fresh.active_run_id);
    } catch (failure) {
      setError(errorText(failure));
    }
  }, [sessionId, loadMessages, loadApprovals, follow]);

  useEffect(() => {
    disposed.current = false;
    refresh();
    return () => {
      disposed.current = true;
      following.current?.controller.abort();
      following.current = null;
      sendController.current?.abort();
    };
  }, [refresh]);

  useFeed((message) => {
    const data = message.data || {};
    if (message.event === "feed.opened") refresh();
    if (data.session_id !== sessionId) return;
    if (message.event === "approval.resolved") setApprovals((shown) => resolvedFrom(shown, data));
    if (message.event.startsWith("approval.")) loadApprovals();
    if (message.event === "run.status" && ["queued", "running"].includes(data.status)) follow(data.run_id);
    // A run decided elsewhere can end before this tab's feed sees it running: its end is the
    // first this tab hears. Not following it, the tab shows the run's end and the reply.
    if (message.event === "run.status" && ["succeeded", "failed", "cancelled"].includes(data.status) && !following.current) {
      setRun((shown) => (shown && shown.runId === data.run_id ? { ...shown, status: data.status } : shown));
      loadMessages();
      loadApprovals();
    }
    if (message.event === "session.changed") {
      api("GET", `/sessions/${sessionId}`).then(setSession, (failure) => {
        if (failure.status === 404) go("sessions");
      });
    }
  });

  const send = async (event) => {
    event?.preventDefault();
    const content = draft.trim();
    if (!content || sending.current) return;
    sending.current = true;
    setSendBusy(true);
    setError(null);
    let runId = null;
    const controller = new AbortController();
    sendController.current = controller;
    // A retry of this very draft (after an error, a double submit) starts one run only.
    sendKey.current = sendKey.current || newKey();
    const sent = () => {
      // The server took the message (its answer named the run): the draft is done with.
      sendKey.current = null;
      setDraft("");
      sessionStorage.removeItem(draftKey(sessionId));
      setMessages((shown) => [...shown, { id: `local-${Date.now()}`, role: "user", content }]);
      runRef.current = emptyRun(runId);
    };
    const stream = readEvents(`/sessions/${sessionId}/messages`, {
      method: "POST",
      body: { content },
      headers: { "Idempotency-Key": sendKey.current },
      signal: controller.signal,
      onOpen: (response) => {
        const location = response.headers.get("Location") || "";
        runId = location.split("/").pop() || null;
      },
    });
    try {
      const first = await stream.next();
      sent();
      const replay = (async function* () {
        if (!first.done) yield first.value;
        yield* stream;
      })();
      follow(runId, { start: replay, controller });
    } catch (failure) {
      if (runId && !(failure instanceof ApiError)) {
        // The connection broke after the server started the run: follow it from its log.
        sent();
        follow(runId);
      } else if (failure instanceof ApiError && failure.code === "run_active") {
        setError(failure.message);
        const active = failure.detail?.run_id;
        if (active) follow(active);
      } else if (!disposed.current) {
        setError(errorText(failure));
      }
    } finally {
      sending.current = false;
      setSendBusy(false);
    }
  };

  const stop = async () => {
    if (!run) return;
    try {
      const cancelled = await api("POST", `/sessions/${sessionId}/runs/${run.runId}/cancel`);
      // The answer is the run as it now is: shown at once, whatever the stream still brings.
      setRun((shown) => (shown && shown.runId === cancelled.id ? { ...shown, status: cancelled.status } : shown));
      if (following.current?.runId === cancelled.id) {
        following.current.controller.abort();
        following.current = null;
      }
      await loadMessages();
      onChanged();
    } catch (failure) {
      setError(errorText(failure));
    }
  };

  const rename = async (event) => {
    event.preventDefault();
    try {
      setSession(await api("PATCH", `/sessions/${sessionId}`, { title: editingTitle }));
      setEditingTitle(null);
      onChanged();
    } catch (failure) {
      setError(errorText(failure));
    }
  };
  const remove = async () => {
    if (!window.confirm("Delete this session with all its messages?")) return;
    try {
      await api("DELETE", `/sessions/${sessionId}`);
      onChanged();
      go("sessions");
    } catch (failure) {
      setError(errorText(failure));
    }
  };

  const active = run && ["queued", "running", "awaiting_approval"].includes(run.status);
  // The reply as it streams, until the stored message is shown in its place.
  const stored = run && messages.some((m) => m.role === "assistant" && m.run_id === run.runId);
  const streaming =
    run && !stored && !["succeeded", "failed", "cancelled"].includes(run.status) && (run.deltas.length || run.tools.length)
      ? run
      : null;
  const onKey = (event) => {
    // Not while an input method composes a character (Enter then confirms the character).
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) send(event);
  };
  return html`
    <div class="chat">
      <div class="chat-head">
        ${editingTitle === null
          ? html`<h2>${session?.title || "Untitled"}</h2>
              <button type="button" class="small secondary" onClick=${() => setEditingTitle(session?.title || "")}>Rename</button>
              <button type="button" class="small danger" onClick=${remove}>Delete session</button>`
          : html`<form onSubmit=${rename} class="row">
              <label class="inline">Title<input value=${editingTitle} maxlength="200"
                onInput=${(e) => setEditingTitle(e.target.value)} /></label>
              <button type="submit" class="small">Save</button>
              <button type="button" class="small secondary" onClick=${() => setEditingTitle(null)}>Cancel</button>
            </form>`}
        ${run && html`<span class=${`badge status-${run.status}`} role="status">Run: ${run.status.replace("_", " ")}</span>`}
        ${run?.connection === "reconnecting" && html`<span class="badge warn" role="status">Reconnecting…</span>`}
      </div>
      <div class="log" role="log" aria-live="polite" aria-label="Conversation" aria-busy=${streaming ? "true" : "false"}>
        ${olderCursor && html`<button type="button" class="small secondary older" onClick=${loadOlder}>Earlier messages</button>`}
        ${messages.map((m) => html`<${MessageView} key=${m.id} message=${m} sessionId=${sessionId} />`)}
        ${streaming && html`<${LiveReply} run=${streaming} />`}
        ${approvals.map(
          (a) => html`<${ApprovalCard} key=${a.id} approval=${a} me=${me}
            onDecided=${(decided) => {
              setApprovals((shown) => shown.map((x) => (x.id === decided.id ? decided : x)));
              follow(decided.run_id);
            }} />`,
        )}
        ${run?.status === "failed" && run.error && html`<p class="error" role="alert">The run failed: ${run.error}</p>`}
      </div>
      ${error && html`<p class="error" role="alert">${error}</p>`}
      <form class="composer" onSubmit=${send}>
        <label class="grow">Message<textarea rows="3" value=${draft} onKeyDown=${onKey}
          onInput=${(e) => {
            setDraft(e.target.value);
            sendKey.current = null; // another message now
            sessionStorage.setItem(draftKey(sessionId), e.target.value);
          }}></textarea></label>
        <div class="buttons">
          <button type="submit" disabled=${active || sendBusy}>Send</button>
          ${active && html`<button type="button" class="danger" onClick=${stop}>Stop</button>`}
        </div>
      </form>
    </div>`;
}

function MessageView({ message, sessionId }) {
  // The same tree while the message is the same: Preact skips it when the log re-renders for
  // every streamed token.
  return useMemo(
    () => html`<article class=${`message ${message.role}`} aria-label=${message.role === "user" ? "You" : "Assistant"}>
    <div class="who">${message.role === "user" ? "You" : "Assistant"}</div>
    ${message.role === "assistant" && message.run_id && html`<${RunSteps} sessionId=${sessionId} runId=${message.run_id} />`}
    ${message.role === "user" ? html`<p class="plain">${message.content}</p>` : html`<${Markdown} text=${message.content} />`}
  </article>`,
    [message.role, message.content, message.run_id, sessionId],
  );
}

function ToolBlocks({ tools }) {
  return tools.map(
    (t) => html`<details class="tool">
      <summary>Tool ${t.tool}${t.output === null ? " (running…)" : ` (${t.duration ?? 0} s)`}</summary>
      <p>Arguments</p><pre>${pretty(t.arguments)}</pre>
      ${t.output !== null && html`<p>Output</p><pre>${t.output}</pre>`}
    </details>`,
  );
}

/** A stored reply's tool calls, read from its run's event log when first opened. */
function RunSteps({ sessionId, runId }) {
  const [tools, setTools] = useState(null);
  const [failed, setFailed] = useState(null);
  const load = async (event) => {
    if (!event.currentTarget.open || tools !== null) return;
    let run = emptyRun(runId);
    try {
      for await (const message of readEvents(`/sessions/${sessionId}/runs/${runId}/events`)) {
        run = applyEvent(run, message);
        if (ENDS.has(message.event)) break;
      }
      setTools(run.tools);
    } catch (failure) {
      setFailed(errorText(failure));
    }
  };
  return html`<details class="steps" onToggle=${load}>
    <summary>Tool calls</summary>
    ${failed && html`<p class="error">${failed}</p>`}
    ${tools === null
      ? !failed && html`<p class="muted">Loading…</p>`
      : tools.length
        ? html`<${ToolBlocks} tools=${tools} />`
        : html`<p class="muted">No tool calls in this reply.</p>`}
  </details>`;
}

function LiveReply({ run }) {
  const text = replyText(run);
  return html`<article class="message assistant live" aria-label="Assistant (streaming)">
    <div class="who">Assistant</div>
    <${ToolBlocks} tools=${run.tools} />
    <div class="streamed">${text}</div>
  </article>`;
}

// --- approval cards ----------------------------------------------------------------------------

/** The cards to show: those shown already (a decided one stays, with its decision) and the
 * pending ones the server has now, oldest first. A card shown as pending that the server no
 * longer lists was decided or expired while no event said so (a missed feed event): it goes. */
function mergeApprovals(shown, pending, complete, settled = []) {
  const ids = new Set(pending.map((p) => p.id));
  const now = new Map(settled.map((a) => [a.id, a]));
  const kept = shown
    .map((a) => now.get(a.id) || a)
    // A card read back just now stays (an expired one not yet swept shows as expired).
    .filter((a) => !ids.has(a.id) && (a.status !== "pending" || !complete || now.has(a.id)));
  return [...kept, ...pending].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

/** The cards shown as pending that a whole fresh list no longer has, as they are now (decided
 * or expired, e.g. in another tab while this one's feed was not yet open): who decided, when
 * and why. A card whose approval is gone is left out. */
async function settleCards(shown, page) {
  if (page.next_cursor) return [];
  const listed = new Set(page.items.map((a) => a.id));
  const stale = shown.filter((a) => a.status === "pending" && !listed.has(a.id));
  const found = await Promise.all(
    stale.map((a) => api("GET", `/sessions/${a.session_id}/approvals/${a.id}`).catch(() => null)),
  );
  return found.filter(Boolean);
}

/** An approval as a feed event tells it (approval.resolved): the card's new state. */
function resolvedFrom(shown, data) {
  return shown.map((a) => (a.id === data.id ? { ...a, ...data } : a));
}

function ApprovalCard({ approval, me, onDecided, showSession = false }) {
  const now = useTick(1000);
  const [editing, setEditing] = useState(false);
  const [args, setArgs] = useState(() => pretty(approval.arguments));
  const [reason, setReason] = useState("");
  const [error, setError] = useState(null);
  const [argsError, setArgsError] = useState(null);
  const [busy, setBusy] = useState(false);
  const key = useMemo(() => newKey(), [approval.id]); // one decision, whatever the retries

  const decide = async (decision) => {
    setError(null);
    setArgsError(null);
    const body = { decision };
    if (decision === "approve" && editing) {
      try {
        body.arguments = JSON.parse(args);
      } catch {
        setArgsError("The arguments are not valid JSON.");
        return;
      }
    }
    if (decision === "reject" && reason.trim()) body.reason = reason.trim();
    if (decision === "approve" && reason.trim()) body.reason = reason.trim();
    setBusy(true);
    try {
      const decided = await api("POST", `/sessions/${approval.session_id}/approvals/${approval.id}`, body, {
        headers: { "Idempotency-Key": `${key}-${decision}-${editing ? "edit" : "as-is"}` },
      });
      onDecided(decided);
    } catch (failure) {
      if (failure instanceof ApiError && failure.status === 422 && editing) setArgsError(failure.message);
      else setError(errorText(failure));
    } finally {
      setBusy(false);
    }
  };

  const expired = new Date(approval.expires_at).getTime() <= now;
  const pending = approval.status === "pending" && !expired;
  const label = `Approval: ${approval.tool}`;
  const shownStatus = approval.status === "pending" && expired ? "expired" : approval.status;
  return html`<article class=${`approval ${shownStatus}`} aria-label=${label}>
    <div class="approval-head">
      <strong>Tool ${approval.tool}</strong>
      <span class="muted">${approval.asked_because}</span>
      ${showSession && html`<a href=${`#/sessions/${approval.session_id}`}>Open session</a>`}
    </div>
    <p class="muted">Arguments as proposed</p>
    <pre>${pretty(approval.arguments)}</pre>
    ${pending
      ? html`
        <p class="muted">You may decide. ${timeLeft(approval.expires_at, now)}.</p>
        ${editing &&
        html`<label>Arguments<textarea rows="6" class="json" value=${args} aria-invalid=${argsError ? "true" : undefined}
          onInput=${(e) => setArgs(e.target.value)}></textarea></label>
          ${argsError && html`<p class="error field-error" role="alert">${argsError}</p>`}`}
        <label>Reason<input value=${reason} maxlength="2000" onInput=${(e) => setReason(e.target.value)} /></label>
        ${error && html`<p class="error" role="alert">${error}</p>`}
        <div class="row">
          <button type="button" disabled=${busy} onClick=${() => decide("approve")}>Approve</button>
          <button type="button" class="secondary" disabled=${busy} onClick=${() => setEditing(!editing)}
            aria-pressed=${editing ? "true" : "false"}>Edit arguments</button>
          <button type="button" class="danger" disabled=${busy} onClick=${() => decide("reject")}>Reject</button>
        </div>`
      : html`<p class="decided" role="status">
          ${approval.status === "approved" ? "Approved" : approval.status === "rejected" ? "Rejected" : "Expired"}
          ${approval.decided_by ? ` by ${approval.decided_by === me.id ? "you" : approval.decided_by}` : ""}
          ${approval.decided_at ? ` at ${time(approval.decided_at)}` : ""}
          ${approval.reason ? ` — ${approval.reason}` : ""}
        </p>
        ${approval.decided_arguments && html`<p class="muted">Approved with edited arguments</p>
          <pre>${pretty(approval.decided_arguments)}</pre>`}`}
  </article>`;
}

// --- approvals inbox -----------------------------------------------------------------------------

function Inbox({ me }) {
  const [items, setItems] = useState(null);
  const [cursor, setCursor] = useState(null);
  const [error, setError] = useState(null);
  const asked = useRef(0);
  const pagedOn = useRef(false);
  const shownRef = useRef([]);
  shownRef.current = items || [];
  const load = useCallback(async () => {
    try {
      const mine = ++asked.current;
      const page = await api("GET", "/approvals?status=pending&limit=50");
      if (mine !== asked.current) return; // a newer answer is on its way
      const settled = pagedOn.current ? [] : await settleCards(shownRef.current, page);
      if (mine !== asked.current) return;
      setItems((shown) => mergeApprovals(shown || [], page.items, !page.next_cursor && !pagedOn.current, settled));
      if (!pagedOn.current) setCursor(page.next_cursor); // else "More" keeps its own place
    } catch (failure) {
      setError(errorText(failure));
    }
  }, []);
  useEffect(() => {
    load();
  }, [load]);
  useFeed((message) => {
    if (message.event === "approval.resolved") setItems((shown) => resolvedFrom(shown || [], message.data));
    if (message.event.startsWith("approval.") || message.event === "feed.opened") load();
  });
  const more = async () => {
    const page = await api("GET", `/approvals?status=pending&limit=50&cursor=${encodeURIComponent(cursor)}`);
    pagedOn.current = true;
    setItems((shown) => [...(shown || []), ...page.items.filter((a) => !(shown || []).some((x) => x.id === a.id))]);
    setCursor(page.next_cursor);
  };
  return html`<section class="inbox">
    <h2>Approvals waiting for you</h2>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${items === null
      ? html`<p class="loading">Loading…</p>`
      : items.length === 0
        ? html`<p class="empty">Nothing waits for a decision.</p>`
        : items.map(
            (a) => html`<${ApprovalCard} key=${a.id} approval=${a} me=${me} showSession=${true}
              onDecided=${(decided) => setItems((shown) => shown.map((x) => (x.id === decided.id ? decided : x)))} />`,
          )}
    ${cursor && html`<button type="button" class="secondary" onClick=${more}>More approvals</button>`}
  </section>`;
}

// --- agents --------------------------------------------------------------------------------------

const POLICIES = ["auto", "ask", "deny"];

function Agents() {
  // null until the first page is in: the form's tools come from it (the default agent's).
  const [agents, setAgents] = useState(null);
  const [editing, setEditing] = useState(null);
  const [error, setError] = useState(null);
  const load = useCallback(async () => {
    try {
      setAgents((await api("GET", "/agents?limit=100")).items);
    } catch (failure) {
      setError(errorText(failure));
    }
  }, []);
  useEffect(() => {
    load();
  }, [load]);
  return html`<section class="agents">
    <h2>Agents</h2>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <button type="button" disabled=${agents === null} onClick=${() => setEditing({ name: "", model: "", instructions: "", tools: agents.find((a) => a.is_default)?.tools || [] })}>New agent</button>
    ${editing && agents && html`<${AgentForm} key=${editing.id || "new"} agent=${editing} catalog=${toolCatalog(agents, editing)}
      onDone=${() => { setEditing(null); load(); }} />`}
    <ul class="cards">
      ${(agents || []).map(
        (a) => html`<li class="card">
          <strong>${a.name}</strong> <span class="muted">${a.model}${a.is_default ? " · default, read-only" : ""}</span>
          <p class="plain">${a.instructions}</p>
          <p class="muted">${a.tools.map((t) => `${t.name}: ${t.policy}${t.rules ? ` (+${t.rules.length} rules)` : ""}`).join(", ")}</p>
          ${!a.is_default && html`<div class="row">
            <button type="button" class="small secondary" onClick=${() => setEditing(a)}>Edit</button>
            <button type="button" class="small danger" onClick=${async () => {
              if (!window.confirm(`Delete the agent ${a.name}?`)) return;
              try { await api("DELETE", `/agents/${a.id}`); load(); } catch (failure) { setError(errorText(failure)); }
            }}>Delete</button></div>`}
        </li>`,
      )}
    </ul>
  </section>`;
}

/** The tools an agent form offers: the default agent's (every built-in) and the agent's own. */
function toolCatalog(agents, agent) {
  const names = [];
  for (const a of [...agents.filter((x) => x.is_default), agent]) {
    for (const t of a.tools || []) if (!names.includes(t.name)) names.push(t.name);
  }
  return names;
}

/** Which field a 422 is about: the first problem's field (a list of {field, message}), the
 * field its detail names (an object), else the field its message names. */
function fieldOf(failure, fields) {
  const detail = failure?.detail;
  const named = Array.isArray(detail) ? detail[0]?.field : null;
  const first = typeof named === "string" ? named.split(".")[0] : "";
  if (fields.includes(first)) return first;
  const key = detail && !Array.isArray(detail) && typeof detail === "object" ? fields.find((f) => f in detail) : null;
  if (key) return key;
  const message = errorText(failure).toLowerCase();
  return fields.find((f) => message.includes(f) || message.includes(f.replace(/s$/, ""))) || "form";
}

function AgentForm({ agent, catalog, onDone }) {
  const [name, setName] = useState(agent.name);
  const [model, setModel] = useState(agent.model);
  const [instructions, setInstructions] = useState(agent.instructions);
  // Every tool of the catalog: used or not, and its policy.
  const [tools, setTools] = useState(() =>
    catalog.map((tool) => {
      const own = (agent.tools || []).find((t) => t.name === tool);
      return { name: tool, used: Boolean(own), policy: own?.policy || "ask", rules: own?.rules || null };
    }),
  );
  const [errors, setErrors] = useState({});
  const change = (index, values) => setTools(tools.map((t, i) => (i === index ? { ...t, ...values } : t)));
  const save = async (event) => {
    event.preventDefault();
    setErrors({});
    // Argument rules are kept as they are (they are edited through the API).
    const body = {
      name,
      instructions,
      tools: tools.filter((t) => t.used).map(({ name: n, policy, rules }) => (rules ? { name: n, policy, rules } : { name: n, policy })),
    };
    if (model) body.model = model;
    try {
      if (agent.id) await api("PATCH", `/agents/${agent.id}`, body);
      else await api("POST", "/agents", body, { headers: { "Idempotency-Key": newKey() } });
      onDone();
    } catch (failure) {
      setErrors({ [fieldOf(failure, ["name", "model", "instructions", "tools"])]: errorText(failure) });
    }
  };
  const fieldError = (f) => errors[f] && html`<p class="error field-error" role="alert">${errors[f]}</p>`;
  return html`<form class="card" onSubmit=${save} aria-label=${agent.id ? `Edit agent ${agent.name}` : "New agent"}>
    <label>Name<input value=${name} required aria-invalid=${errors.name ? "true" : undefined}
      onInput=${(e) => setName(e.target.value)} /></label>${fieldError("name")}
    <label>Model<input value=${model} placeholder="demo" aria-invalid=${errors.model ? "true" : undefined}
      onInput=${(e) => setModel(e.target.value)} /></label>${fieldError("model")}
    <label>Instructions<textarea rows="4" value=${instructions} onInput=${(e) => setInstructions(e.target.value)}></textarea></label>${fieldError("instructions")}
    <fieldset class="tools">
      <legend>Tools</legend>
      ${tools.map(
        (t, index) => html`<div class="row tool-row">
          <label class="inline"><input type="checkbox" checked=${t.used}
            onChange=${(e) => change(index, { used: e.target.checked })} /> ${t.name}</label>
          <label class="inline">Policy for ${t.name}<select value=${t.policy} disabled=${!t.used}
            onChange=${(e) => change(index, { policy: e.target.value })}>
            ${POLICIES.map((p) => html`<option value=${p}>${p}</option>`)}
          </select></label>
          ${t.rules && html`<span class="muted">${t.rules.length} argument rule${t.rules.length === 1 ? "" : "s"} first (kept)</span>`}
        </div>`,
      )}
    </fieldset>${fieldError("tools")}
    ${fieldError("form")}
    <div class="row"><button type="submit">Save agent</button>
      <button type="button" class="secondary" onClick=${onDone}>Cancel</button></div>
  </form>`;
}

// --- API keys ------------------------------------------------------------------------------------

function ApiKeys() {
  const [keys, setKeys] = useState([]);
  const [name, setName] = useState("");
  const [created, setCreated] = useState(null);
  const [error, setError] = useState(null);
  const load = useCallback(async () => {
    try {
      setKeys((await api("GET", "/api-keys?limit=100")).items);
    } catch (failure) {
      setError(errorText(failure));
    }
  }, []);
  useEffect(() => {
    load();
  }, [load]);
  const create = async (event) => {
    event.preventDefault();
    setError(null);
    try {
      setCreated(await api("POST", "/api-keys", { name }));
      setName("");
      load();
    } catch (failure) {
      setError(errorText(failure));
    }
  };
  return html`<section class="keys">
    <h2>API keys</h2>
    <form class="row" onSubmit=${create}>
      <label class="inline">Key name<input value=${name} required maxlength="100" onInput=${(e) => setName(e.target.value)} /></label>
      <button type="submit">Create key</button>
    </form>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${created && html`<div class="card notice" role="status">
      <p>The key <strong>${created.name}</strong> is shown only now:</p>
      <pre class="secret">${created.key}</pre>
      <button type="button" class="small" onClick=${() => navigator.clipboard?.writeText(created.key)}>Copy key</button>
    </div>`}
    <table>
      <thead><tr><th>Name</th><th>Prefix</th><th>Created</th><th>Last used</th><th></th></tr></thead>
      <tbody>
        ${keys.map(
          (k) => html`<tr>
            <td>${k.name}</td><td><code>${k.prefix}</code></td><td>${time(k.created_at)}</td>
            <td>${k.last_used_at ? time(k.last_used_at) : "never"}</td>
            <td><button type="button" class="small danger" aria-label=${`Delete key ${k.name}`} onClick=${async () => {
              if (!window.confirm(`Delete the key ${k.name}? It stops working at once.`)) return;
              try { await api("DELETE", `/api-keys/${k.id}`); load(); } catch (failure) { setError(errorText(failure)); }
            }}>Delete</button></td></tr>`,
        )}
      </tbody>
    </table>
  </section>`;
}

render(html`<${App} />`, document.getElementById("app"));
