// MeshPilot web console: plain DOM over the edge's /v1 API. Every value from the mesh becomes a text node
// (el() below): nothing a run produced is ever parsed as HTML.
"use strict";

const KEY_STORAGE = "meshpilot.apiKey";
const STATES = ["running", "waiting_for_approval", "succeeded", "failed", "cancelled"];
const ENDED = ["succeeded", "failed", "cancelled"];
const POLL_MS = 3000;
const PAGE = 50; // runs per page of the list (the edge pages up to the newest 500)
let current = null; // the view on screen: {stop()} ends its timers and streams when the view changes

// ---- DOM ----

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function show(...nodes) {
  const view = document.getElementById("view");
  view.replaceChildren(...nodes);
}

function notice(message) {
  const box = document.getElementById("notice");
  box.textContent = message || "";
  box.hidden = !message;
}

// ---- API ----

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function headers(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || "HTTP " + status);
    this.status = status;
  }
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const reply = await fetch(path, init);
  let data = null;
  try {
    data = await reply.json();
  } catch (_) {
    data = null;
  }
  if (!reply.ok && !(path === "/v1/health" && data)) throw new ApiError(reply.status, data);
  return data;
}

function explain(error) {
  if (error.status === 401) return error.message + " — enter an API key above.";
  return error.message;
}

// Follows a run's events as server-sent events over fetch (an EventSource cannot send the API key): every event
// carries its sequence as its id; after a broken connection it asks again with Last-Event-ID, so nothing is missed
// or repeated. 204 means the run has ended and nothing follows.
function followRun(runId, after, onEvent) {
  let last = after;
  let stopped = false;
  let controller = null;
  const ended = (data) => "final_answer" in data || "error" in data;

  async function connect() {
    while (!stopped) {
      controller = new AbortController();
      try {
        const reply = await fetch(`/v1/runs/${encodeURIComponent(runId)}/events`, {
          headers: headers({ Accept: "text/event-stream", "Last-Event-ID": String(last) }),
          signal: controller.signal,
        });
        if (reply.status === 204) return;
        if (!reply.ok) {
          const body = await reply.json().catch(() => null);
          throw new ApiError(reply.status, body);
        }
        const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const message = parseBlock(block);
            if (!message) continue;
            if (message.event === "stream_error") throw new ApiError(503, message.data);
            if (message.data.sequence <= last) continue;
            last = message.data.sequence;
            onEvent(message.data);
            if (ended(message.data)) return;
          }
        }
      } catch (error) {
        if (stopped) return;
        if (error.status && error.status < 500) {
          notice(explain(error));
          return;
        }
      }
      // The stream broke (the edge or planner restarted): reconnect after the last event seen.
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
  connect();
  return {
    stop() {
      stopped = true;
      if (controller) controller.abort();
    },
  };
}

function parseBlock(block) {
  const fields = {};
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const key = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    fields[key] = key in fields ? fields[key] + "\n" + value : value;
  }
  if (!("data" in fields)) return null;
  return { event: fields.event || "message", id: fields.id, data: JSON.parse(fields.data) };
}

// ---- formatting ----

function stateName(state) {
  return String(state || "").replace(/^RUN_STATE_/, "").toLowerCase();
}

function badge(state) {
  const name = stateName(state);
  return el("span", { class: "badge " + name }, name.replace(/_/g, " "));
}

function seconds(duration) {
  return duration ? parseFloat(String(duration)) : 0;
}

function ms(value) {
  if (value >= 1000) return (value / 1000).toFixed(2) + " s";
  return value.toFixed(value < 10 ? 1 : 0) + " ms";
}

function when(timestamp) {
  if (!timestamp) return "";
  const date = new Date(timestamp);
  return date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function tokens(usage) {
  if (!usage || !usage.total_tokens) return "";
  return `${usage.total_tokens} tokens (${usage.prompt_tokens || 0} in, ${usage.completion_tokens || 0} out)`;
}

function json(value) {
  return el("pre", { class: "json" }, JSON.stringify(value === undefined ? {} : value, null, 2));
}

function short(text, n) {
  text = String(text || "");
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

// ---- views ----

function runsHash(state, offset) {
  const query = new URLSearchParams();
  if (state) query.set("state", state);
  if (offset) query.set("offset", offset);
  return "#/runs" + (query.toString() ? "?" + query : "");
}

function runsView(params) {
  const state = params.get("state") || "";
  const offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
  const table = el("tbody");
  const pager = el("nav", { class: "pager" });
  const filter = el(
    "select",
    { id: "state-filter", onchange: (e) => (location.hash = runsHash(e.target.value, 0)) },
    el("option", { value: "" }, "every state"),
    STATES.map((s) => el("option", { value: s, selected: s === state }, s.replace(/_/g, " ")))
  );
  const agentSelect = el("select", { id: "new-agent" });
  const task = el("input", { id: "new-task", placeholder: "Ask an agent something…", required: true, maxlength: 4000 });
  const form = el(
    "form",
    {
      class: "new-run",
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          const run = await api("POST", `/v1/agents/${encodeURIComponent(agentSelect.value)}/runs`, {
            task: task.value,
            wait: false,
          });
          location.hash = "#/runs/" + encodeURIComponent(run.run_id);
        } catch (error) {
          notice(explain(error));
        }
      },
    },
    agentSelect,
    task,
    el("button", { type: "submit" }, "Start run")
  );
  show(
    el("section", { class: "toolbar" }, el("h1", {}, "Runs"), el("label", { for: "state-filter" }, "State"), filter),
    form,
    el(
      "table",
      { class: "runs" },
      el("thead", {}, el("tr", {}, ["Run", "Agent", "Task", "State", "Started", "Tokens", "Answer"].map((h) => el("th", {}, h)))),
      table
    ),
    pager
  );
  api("GET", "/v1/agents")
    .then((agents) => {
      agentSelect.replaceChildren(...agents.data.map((a) => el("option", { value: a.name }, a.name)));
      if (params.get("agent")) agentSelect.value = params.get("agent");
    })
    .catch(() => agentSelect.replaceChildren(el("option", { value: "default" }, "default")));

  async function refresh() {
    try {
      const query = new URLSearchParams({ limit: PAGE, offset });
      if (state) query.set("state", state);
      const runs = await api("GET", "/v1/runs?" + query);
      notice("");
      pager.replaceChildren(
        offset ? el("a", { href: runsHash(state, Math.max(0, offset - PAGE)), id: "newer" }, "← Newer") : "",
        runs.has_more ? el("a", { href: runsHash(state, offset + PAGE), id: "older" }, "Older →") : ""
      );
      table.replaceChildren(
        ...(runs.data.length
          ? runs.data.map((run) =>
              el(
                "tr",
                { class: "run-row", "data-run": run.run_id },
                el("td", {}, el("a", { href: "#/runs/" + encodeURIComponent(run.run_id), class: "mono" }, short(run.run_id, 13))),
                el("td", { class: "nowrap" }, `${run.agent || "default"} v${run.agent_version || 1}`),
                el("td", { class: "task" }, short(run.task, 80)),
                el("td", {}, badge(run.state)),
                el("td", { class: "dim nowrap" }, when(run.create_time)),
                el("td", { class: "num" }, run.usage && run.usage.total_tokens ? run.usage.total_tokens : ""),
                el("td", { class: "answer" }, short(run.answer, 80))
              )
            )
          : [el("tr", {}, el("td", { colspan: 7, class: "empty" }, "No runs" + (state ? " in this state" : "") + " yet."))])
      );
    } catch (error) {
      notice(explain(error));
    }
  }
  refresh();
  const timer = setInterval(refresh, POLL_MS);
  return { stop: () => clearInterval(timer) };
}

function agentsView() {
  const list = el("div", { class: "cards" });
  show(el("section", { class: "toolbar" }, el("h1", {}, "Agents")), list);
  api("GET", "/v1/agents")
    .then((agents) => {
      notice("");
      list.replaceChildren(
        ...agents.data.map((agent) => {
          const spec = agent.spec || {};
          const policy = (spec.policy && spec.policy.name) || "guided";
          return el(
            "article",
            { class: "card agent" },
            el("h2", {}, agent.name, el("span", { class: "dim" }, ` v${agent.version}`), agent.builtin ? el("span", { class: "tag" }, "built-in") : null),
            el(
              "dl",
              {},
              el("dt", {}, "policy"),
              el("dd", {}, policy),
              el("dt", {}, "model"),
              el("dd", {}, spec.model || "inference default"),
              el("dt", {}, "tools"),
              el("dd", {}, (spec.tools || []).join(", ") || "none"),
              el("dt", {}, "needs approval"),
              el("dd", {}, (spec.approval_required || []).join(", ") || "—")
            ),
            el("details", {}, el("summary", {}, "instructions"), el("pre", { class: "text" }, spec.instructions || "")),
            el("p", { class: "card-actions" }, el("a", { href: "#/runs?agent=" + encodeURIComponent(agent.name) }, "Start a run →"))
          );
        })
      );
    })
    .catch((error) => notice(explain(error)));
  return null;
}

function healthView() {
  const table = el("tbody");
  const overall = el("span", { class: "badge" }, "…");
  show(
    el("section", { class: "toolbar" }, el("h1", {}, "Mesh health"), overall),
    el("table", { class: "health" }, el("thead", {}, el("tr", {}, ["Service", "Target", "Status", "Detail"].map((h) => el("th", {}, h)))), table)
  );
  async function refresh() {
    try {
      const health = await api("GET", "/v1/health");
      notice("");
      overall.className = "badge " + (health.status === "serving" ? "succeeded" : "failed");
      overall.textContent = health.status;
      table.replaceChildren(
        ...health.services.map((s) =>
          el(
            "tr",
            {},
            el("td", {}, s.name),
            el("td", { class: "mono" }, s.target),
            el("td", {}, el("span", { class: "badge " + (s.status === "SERVING" ? "succeeded" : "failed") }, s.status.toLowerCase().replace(/_/g, " "))),
            el("td", { class: "dim" }, s.detail)
          )
        )
      );
    } catch (error) {
      notice(explain(error));
    }
  }
  refresh();
  const timer = setInterval(refresh, POLL_MS);
  return { stop: () => clearInterval(timer) };
}

// One run: its header, then a timeline grouped by step that grows with every event of the stream.
function runView(runId) {
  const header = el("section", { class: "run-head" });
  const timeline = el("ol", { class: "timeline", id: "timeline" });
  const answer = el("section", { class: "answer-box", hidden: true });
  show(el("p", { class: "crumbs" }, el("a", { href: "#/runs" }, "← Runs")), header, answer, timeline);
  const decided = new Set(); // calls with an approval_decision event: their buttons go away
  const approvalCards = new Map();
  let run = null;
  let stream = null;
  const steps = new Map();

  function renderHeader() {
    const actions = [];
    const state = stateName(run.state);
    if (state === "running" || state === "waiting_for_approval") {
      actions.push(
        el("button", { class: "danger", id: "cancel-run", onclick: () => act("POST", `/v1/runs/${encodeURIComponent(runId)}/cancel`) }, "Cancel run")
      );
    }
    header.replaceChildren(
      el("div", { class: "title" }, el("h1", { class: "task" }, run.task), badge(run.state), ...actions),
      el(
        "dl",
        { class: "facts" },
        el("dt", {}, "run"),
        el("dd", { class: "mono" }, run.run_id),
        el("dt", {}, "agent"),
        el("dd", {}, `${run.agent || "default"} v${run.agent_version || 1}`),
        el("dt", {}, "session"),
        el("dd", { class: "mono" }, run.session_id),
        el("dt", {}, "started"),
        el("dd", {}, when(run.create_time)),
        el("dt", {}, "tokens"),
        el("dd", {}, tokens(run.usage) || "—"),
        el("dt", {}, "took"),
        el("dd", {}, run.end_time ? ms(new Date(run.end_time) - new Date(run.create_time)) : "—")
      )
    );
    if (run.answer) {
      answer.hidden = false;
      answer.replaceChildren(el("h2", {}, "Answer"), el("p", { id: "answer" }, run.answer));
    }
  }

  async function act(method, path, body) {
    try {
      run = Object.assign(run, await api(method, path, body));
      notice("");
      renderHeader();
      return true;
    } catch (error) {
      notice(explain(error));
      return false;
    }
  }

  function stepBox(step) {
    if (!steps.has(step)) {
      const items = el("ul", { class: "events" });
      const box = el("li", { class: "step", "data-step": step }, el("h3", {}, step ? "Step " + step : "Run"), items);
      steps.set(step, items);
      timeline.append(box);
    }
    return steps.get(step);
  }

  function card(kindName, title, ...body) {
    return el("li", { class: "event " + kindName.replace(/_/g, "-"), "data-kind": kindName }, el("div", { class: "event-title" }, title), ...body);
  }

  function approvalButtons(request) {
    const reason = el("input", { class: "reason", placeholder: "reason (for a reject)", maxlength: 1000 });
    const base = `/v1/runs/${encodeURIComponent(runId)}/tool-calls/${encodeURIComponent(request.call_id)}`;
    // One decision per call: both buttons are disabled while it is sent, and again usable only if it failed.
    const decide = (path, body) => async () => {
      buttons.forEach((b) => (b.disabled = true));
      if (!(await act("POST", base + path, body()))) buttons.forEach((b) => (b.disabled = false));
    };
    const buttons = [
      el("button", { class: "approve", onclick: decide("/approve", () => ({})) }, "Approve"),
      el("button", { class: "reject", onclick: decide("/reject", () => ({ reason: reason.value })) }, "Reject"),
    ];
    return el("div", { class: "approval-actions" }, buttons, reason);
  }

  function add(event) {
    const kind = Object.keys(event).find((k) => !["run_id", "session_id", "sequence", "time"].includes(k));
    const data = event[kind] || {};
    const items = stepBox(data.step || 0);
    const offset = run && run.create_time && event.time ? (new Date(event.time) - new Date(run.create_time)) / 1000 : null;
    const at = el("span", { class: "seq", title: when(event.time) }, "#" + event.sequence + (offset === null ? "" : ` +${offset.toFixed(1)}s`));
    switch (kind) {
      case "step_started":
        break;
      case "plan":
        items.append(card(kind, [at, "Plan ", el("span", { class: "dim" }, "revision " + data.revision)], el("ol", { class: "plan" }, (data.steps || []).map((s) => el("li", {}, s)))));
        break;
      case "model_output": {
        const t = data.timings || {};
        items.append(
          card(
            kind,
            [at, "Model output", el("span", { class: "meta" }, [tokens(data.usage), t.total_ms ? ms(t.total_ms) : ""].filter(Boolean).join(" · "))],
            el("pre", { class: "text" }, data.text || "")
          )
        );
        break;
      }
      case "tool_call":
        items.append(card(kind, [at, "Tool call ", el("code", {}, data.tool), el("span", { class: "dim" }, " " + data.call_id)], json(data.arguments)));
        break;
      case "tool_result": {
        const meta = [ms(seconds(data.duration) * 1000)];
        if (data.replayed) meta.push("replayed");
        const failed = "error" in data;
        items.append(
          card(
            failed ? "tool_error" : kind,
            [at, failed ? "Tool error " : "Tool result ", el("code", {}, data.tool), el("span", { class: "meta" }, meta.join(" · "))],
            failed ? el("pre", { class: "text error-text" }, data.error) : json(data.result)
          )
        );
        break;
      }
      case "approval_requested": {
        const box = card(
          kind,
          [at, "Approval needed for ", el("code", {}, data.tool), el("span", { class: "dim" }, " " + data.call_id)],
          el("p", { class: "reason-text" }, data.reason),
          json(data.arguments)
        );
        approvalCards.set(data.call_id, box);
        // Buttons while the call is undecided and the run goes on (a replay shows the decision right after).
        if (!decided.has(data.call_id) && !ENDED.includes(stateName(run.state))) box.append(approvalButtons(data));
        items.append(box);
        break;
      }
      case "approval_decision": {
        decided.add(data.call_id);
        const pending = approvalCards.get(data.call_id);
        if (pending) pending.querySelectorAll(".approval-actions").forEach((n) => n.remove());
        items.append(
          card(
            data.approved ? "approved" : "rejected",
            [at, data.approved ? "Approved " : "Rejected ", el("code", {}, data.tool)],
            data.comment ? el("p", {}, data.comment) : null
          )
        );
        break;
      }
      case "final_answer":
        items.append(
          card(kind, [at, "Final answer", el("span", { class: "meta" }, [tokens(data.usage), ms(seconds(data.duration) * 1000)].filter(Boolean).join(" · "))], el("p", { class: "final" }, data.answer))
        );
        break;
      case "error":
        items.append(card("run_error", [at, "Run failed: ", el("code", {}, data.code)], el("p", { class: "error-text" }, data.message)));
        break;
      default:
        items.append(card("other", [at, kind || "event"], json(data)));
    }
    // The run's header follows its events; the stored run is read again when the state may have changed.
    if (["approval_requested", "approval_decision", "final_answer", "error"].includes(kind)) refreshRun();
  }

  async function refreshRun() {
    try {
      const fresh = await api("GET", `/v1/runs/${encodeURIComponent(runId)}`);
      run = Object.assign(run || {}, fresh);
      renderHeader();
      // A run that ended (cancelled while it waited) takes no more decisions.
      if (ENDED.includes(stateName(run.state))) approvalCards.forEach((box) => box.querySelectorAll(".approval-actions").forEach((n) => n.remove()));
    } catch (error) {
      notice(explain(error));
    }
  }

  api("GET", `/v1/runs/${encodeURIComponent(runId)}`)
    .then((fresh) => {
      run = fresh;
      notice("");
      renderHeader();
      stream = followRun(runId, 0, add);
    })
    .catch((error) => {
      header.replaceChildren(el("h1", {}, "Run " + short(runId, 40)));
      notice(explain(error));
    });
  return {
    stop() {
      if (stream) stream.stop();
    },
  };
}

// ---- routing ----

function route() {
  if (current && current.stop) current.stop();
  notice("");
  const hash = location.hash.replace(/^#/, "") || "/runs";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === parts[0]));
  if (parts[0] === "runs" && parts[1]) current = runView(decodeURIComponent(parts[1]));
  else if (parts[0] === "agents") current = agentsView();
  else if (parts[0] === "health") current = healthView();
  else current = runsView(params);
}

document.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("api-key");
  input.value = apiKey();
  document.getElementById("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (input.value.trim()) localStorage.setItem(KEY_STORAGE, input.value.trim());
    else localStorage.removeItem(KEY_STORAGE);
    route();
  });
  window.addEventListener("hashchange", route);
  route();
});
