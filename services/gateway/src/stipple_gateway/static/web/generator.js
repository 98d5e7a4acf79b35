// The image generator: a task form, the task's per-node progress from its events stream,
// its images with their seeds, and this browser's recent tasks (localStorage).
import { useEffect, useRef, useState } from "preact/hooks";
import {
  ApiError,
  ErrorBox,
  KeyField,
  Nav,
  apiJson,
  apiKey,
  config,
  events,
  html,
  mount,
  shortId,
  useImageSrc,
} from "./common.js";

const GALLERY = "stipple.gallery";
const GALLERY_MAX = 30;
const FINAL = new Set(["succeeded", "aborted", "cancelled"]);

function loadGallery() {
  try {
    const items = JSON.parse(localStorage.getItem(GALLERY) || "[]");
    return Array.isArray(items) ? items : [];
  } catch (_) {
    return [];
  }
}

function saveGallery(items) {
  localStorage.setItem(GALLERY, JSON.stringify(items.slice(0, GALLERY_MAX)));
}

/** The form field an API error names (`task_config.steps` -> "steps"). */
function formField(field) {
  if (!field) return "";
  const last = field.split(".").pop();
  const names = { image_width: "width", image_height: "height", base_model: "model", init_image: "init_image" };
  return names[last] || last;
}

function ResultImage({ image, taskId }) {
  const src = useImageSrc(image.url);
  return html`<figure class="result">
    <img src=${src} alt=${`image ${image.index} of task ${taskId}`} width=${image.width} height=${image.height}
      data-seed=${image.seed} />
    <figcaption>
      <span class="seed">seed <code>${image.seed}</code></span>
      ${src && html`<a class="download" href=${src} download=${`stipple-${taskId}-${image.index}.png`}>Download</a>`}
    </figcaption>
  </figure>`;
}

function Thumb({ item, onOpen }) {
  const first = item.images[0];
  const src = useImageSrc(first.url);
  return html`<li class="thumb" data-task=${item.task_id}>
    <button type="button" onClick=${() => onOpen(item)} title=${item.prompt}>
      ${src ? html`<img src=${src} alt=${item.prompt} />` : html`<span class="missing">no image</span>`}
    </button>
    <span class="thumb-caption">${shortId(item.task_id)}</span>
  </li>`;
}

function Progress({ nodes }) {
  const ids = Object.keys(nodes);
  if (!ids.length) return null;
  return html`<section class="progress">
    <h3>Progress</h3>
    ${ids.map((id) => {
      const p = nodes[id];
      return html`<div class="node-progress" data-node=${id}>
        <a class="node-link" href=${`/nodes/${id}`}>${shortId(id)}</a>
        <progress value=${p.step} max=${p.total || 1}></progress>
        <span class="steps">${p.step}/${p.total || "?"}</span>
        <span class="node-status">${p.status}</span>
      </div>`;
    })}
  </section>`;
}

function Generator() {
  const [models, setModels] = useState([]);
  const [loadError, setLoadError] = useState(null);
  const [needKey, setNeedKey] = useState(Boolean(apiKey()));
  const [form, setForm] = useState({
    prompt: "",
    negative_prompt: "",
    model: "",
    width: 512,
    height: 512,
    steps: 25,
    sampler: "",
    seed: "",
    strength: 0.75,
  });
  const [init, setInit] = useState(null); // {name, dataUrl}
  const [error, setError] = useState(null);
  const [task, setTask] = useState(null); // {task_id, status, seed, nodes: {id: {step,total,status}}, images, detail}
  const [busy, setBusy] = useState(false);
  const [gallery, setGallery] = useState(loadGallery());
  const abort = useRef(null);

  const loadModels = async () => {
    try {
      const body = await apiJson("/v1/nodes");
      const names = [...new Set(body.nodes.filter((n) => n.live).flatMap((n) => n.models))].sort();
      setModels(names);
      setForm((f) => ({ ...f, model: names.includes(f.model) ? f.model : names[0] || "" }));
      setLoadError(null);
    } catch (e) {
      if (e.status === 401) setNeedKey(true);
      setLoadError(e);
    }
  };
  useEffect(() => {
    loadModels();
    return () => abort.current && abort.current.abort();
  }, []);

  const set = (name) => (e) => setForm({ ...form, [name]: e.target.value });
  const number = (value) => (value === "" ? NaN : Number(value));

  const pickInit = (e) => {
    const file = e.target.files[0];
    if (!file) {
      setInit(null);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => setInit({ name: file.name, dataUrl: reader.result });
    reader.readAsDataURL(file);
  };

  const spec = () => {
    const body = {
      base_model: form.model,
      prompt: form.prompt,
      task_config: {
        image_width: number(form.width),
        image_height: number(form.height),
        steps: number(form.steps),
        seed: form.seed === "" ? -1 : number(form.seed),
      },
    };
    if (form.negative_prompt) body.negative_prompt = form.negative_prompt;
    if (form.sampler) body.sampler = form.sampler;
    if (init) {
      body.kind = "img2img";
      body.init_image = init.dataUrl;
      body.strength = number(form.strength);
    }
    return body;
  };

  const remember = (view, prompt) => {
    const item = {
      task_id: view.task_id,
      prompt,
      model: view.task && typeof view.task.base_model === "string" ? view.task.base_model : form.model,
      at: Date.now() / 1000,
      images: view.images,
    };
    const items = [item, ...loadGallery().filter((i) => i.task_id !== view.task_id)];
    saveGallery(items);
    setGallery(items.slice(0, GALLERY_MAX));
  };

  const follow = async (accepted, prompt, steps, signal) => {
    let state = { task_id: accepted.task_id, status: "pending", seed: accepted.seed, nodes: {}, images: null };
    const update = (change) => {
      state = { ...state, ...change };
      setTask(state);
    };
    const node = (id, change) =>
      update({ nodes: { ...state.nodes, [id]: { step: 0, total: steps, status: "assigned", ...state.nodes[id], ...change } } });
    update({});
    let outcome = null;
    try {
      for await (const frame of events(`/v1/tasks/${accepted.task_id}/events`, signal)) {
        const d = frame.data;
        if (frame.event === "assigned" || frame.event === "extended") {
          update({ status: "assigned" });
          for (const id of d.nodes || []) node(id, {});
        } else if (frame.event === "reassigned") {
          node(d.replaced, { status: "replaced" });
          node(d.by, {});
        } else if (frame.event === "progress") {
          node(d.node_id, { step: d.step, total: d.total, status: "running" });
        } else if (frame.event === "started") {
          update({ status: "running" });
          node(d.node_id, { status: "running" });
        } else if (frame.event === "committed" || frame.event === "revealed") {
          const total = (state.nodes[d.node_id] || {}).total || steps;
          node(d.node_id, { step: total, total, status: frame.event });
        } else if (frame.event === "errored") {
          node(d.node_id, { status: "errored" });
        } else if (FINAL.has(frame.event)) {
          outcome = frame.event;
          break;
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      // the stream broke: the task's state is read below
    }
    const view = await apiJson(`/v1/tasks/${accepted.task_id}`);
    update({ status: view.status, images: view.images || null, detail: view.outcome });
    if (view.status === "succeeded") remember(view, prompt);
    else if (FINAL.has(view.status) || outcome) {
      const o = view.outcome || {};
      setError({ code: o.reason || view.status, message: `task ${view.task_id} ${view.status}: ${o.detail || o.reason || ""}` });
    }
  };

  const generate = async (e) => {
    e.preventDefault();
    if (abort.current) abort.current.abort();
    const controller = new AbortController();
    abort.current = controller;
    setError(null);
    setTask(null);
    setBusy(true);
    try {
      const body = spec();
      const accepted = await apiJson("/v1/tasks", { method: "POST", json: body });
      await follow(accepted, form.prompt, body.task_config.steps, controller.signal);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) setNeedKey(true);
      setError(err instanceof ApiError ? err : { code: "error", message: String(err) });
    } finally {
      setBusy(false);
    }
  };

  const open = (item) => {
    setError(null);
    setTask({ task_id: item.task_id, status: "succeeded", seed: item.images[0].seed, nodes: {}, images: item.images });
  };
  const forget = () => {
    saveGallery([]);
    setGallery([]);
  };

  const bad = formField(error && error.field);
  const invalid = (name) => (bad === name ? "true" : undefined);

  return html`
    <${Nav} page="generator" />
    <main class="generator">
      ${needKey && html`<${KeyField} onSaved=${loadModels} />`}
      ${loadError && html`<${ErrorBox} error=${loadError} />`}
      <form class="task-form" onSubmit=${generate} novalidate>
        <label class="wide">Prompt
          <textarea name="prompt" rows="3" value=${form.prompt} onInput=${set("prompt")} aria-invalid=${invalid("prompt")}
            placeholder="a red fox in the snow"></textarea></label>
        <label class="wide">Negative prompt
          <textarea name="negative_prompt" rows="2" value=${form.negative_prompt} onInput=${set("negative_prompt")}
            aria-invalid=${invalid("negative_prompt")}></textarea></label>
        <label>Model
          <select name="model" value=${form.model} onChange=${set("model")} aria-invalid=${invalid("model")}>
            ${models.length === 0 && html`<option value="">no live node</option>`}
            ${models.map((m) => html`<option value=${m}>${m}</option>`)}
          </select></label>
        <label>Sampler
          <select name="sampler" value=${form.sampler} onChange=${set("sampler")} aria-invalid=${invalid("sampler")}>
            <option value="">model default</option>
            ${config.samplers.map((s) => html`<option value=${s}>${s}</option>`)}
          </select></label>
        <label>Width <input type="number" name="width" step="8" min="64" max=${config.max_side} value=${form.width}
          onInput=${set("width")} aria-invalid=${invalid("width")} /></label>
        <label>Height <input type="number" name="height" step="8" min="64" max=${config.max_side} value=${form.height}
          onInput=${set("height")} aria-invalid=${invalid("height")} /></label>
        <label>Steps <input type="number" name="steps" min="1" max=${config.max_steps} value=${form.steps}
          onInput=${set("steps")} aria-invalid=${invalid("steps")} /></label>
        <label>Seed <input type="number" name="seed" min="-1" placeholder="random" value=${form.seed}
          onInput=${set("seed")} aria-invalid=${invalid("seed")} /></label>
        <label>Init image (img2img) <input type="file" name="init_image" accept="image/png,image/jpeg,image/webp"
          onChange=${pickInit} aria-invalid=${invalid("init_image")} /></label>
        <label>Strength <input type="number" name="strength" step="0.05" min="0" max="1" value=${form.strength}
          disabled=${!init} onInput=${set("strength")} aria-invalid=${invalid("strength")} /></label>
        ${init && html`<img class="init-preview" src=${init.dataUrl} alt=${init.name} />`}
        <div class="actions wide">
          <button type="submit" name="generate" disabled=${busy}>${busy ? "Generating…" : "Generate"}</button>
          ${!needKey && html`<button type="button" class="link" onClick=${() => setNeedKey(true)}>API key…</button>`}
        </div>
      </form>
      <${ErrorBox} error=${error} />
      ${task &&
      html`<section class="task" data-task=${task.task_id} data-status=${task.status}>
        <h2>Task <code>${task.task_id}</code> <span class="status">${task.status}</span></h2>
        <${Progress} nodes=${task.nodes} />
        ${task.images &&
        html`<div class="results">${task.images.map((image) => html`<${ResultImage} image=${image} taskId=${task.task_id} />`)}</div>`}
      </section>`}
      <section class="gallery">
        <h2>Recent tasks in this browser</h2>
        ${gallery.length === 0
          ? html`<p class="muted">None yet.</p>`
          : html`<ul class="thumbs">${gallery.map((item) => html`<${Thumb} item=${item} onOpen=${open} />`)}</ul>
              <button type="button" class="link" onClick=${forget}>Forget them</button>`}
      </section>
    </main>
  `;
}

mount(Generator);
