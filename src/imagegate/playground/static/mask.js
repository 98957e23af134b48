// A simple brush to paint a mask over the first input image. OpenAI semantics: the mask has the
// image's size, and its transparent pixels are where the edit happens. Painted strokes show in red.

export class MaskPainter {
  constructor(canvas, brush) {
    this.canvas = canvas;
    this.brush = brush;
    this.image = null;
    this.strokes = document.createElement("canvas");
    this.painted = false;
    this.down = false;
    canvas.addEventListener("pointerdown", (e) => this.start(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "pointerleave"]) canvas.addEventListener(type, () => this.stop());
  }

  // Show the painter over `file` (an image File); resolves once the image is drawn.
  async open(file) {
    const url = URL.createObjectURL(file);
    try {
      const image = new Image();
      image.src = url;
      await image.decode();
      this.image = image;
    } finally {
      URL.revokeObjectURL(url);
    }
    for (const c of [this.canvas, this.strokes]) {
      c.width = this.image.naturalWidth;
      c.height = this.image.naturalHeight;
    }
    this.painted = false;
    this.canvas.hidden = false;
    this.render();
  }

  close() {
    this.canvas.hidden = true;
    this.image = null;
    this.painted = false;
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return [
      ((event.clientX - box.left) / box.width) * this.canvas.width,
      ((event.clientY - box.top) / box.height) * this.canvas.height,
    ];
  }

  start(event) {
    if (!this.image) return;
    this.down = true;
    this.canvas.setPointerCapture(event.pointerId);
    this.last = this.point(event);
    this.dab(this.last, this.last);
  }

  move(event) {
    if (!this.down) return;
    const next = this.point(event);
    this.dab(this.last, next);
    this.last = next;
  }

  stop() {
    if (this.down) this.canvas.dispatchEvent(new CustomEvent("maskchange"));
    this.down = false;
  }

  dab(from, to) {
    const ctx = this.strokes.getContext("2d");
    const scale = this.canvas.width / Math.max(1, this.canvas.getBoundingClientRect().width);
    ctx.strokeStyle = "rgb(230, 40, 60)";
    ctx.lineCap = "round";
    ctx.lineWidth = Number(this.brush.value) * scale;
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
    this.painted = true;
    this.render();
  }

  render() {
    const ctx = this.canvas.getContext("2d");
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.drawImage(this.image, 0, 0);
    ctx.globalAlpha = 0.55;
    ctx.drawImage(this.strokes, 0, 0);
    ctx.globalAlpha = 1;
  }

  // The mask as a PNG File (opaque black, transparent where painted), or null when nothing is painted.
  async toFile() {
    if (!this.image || !this.painted) return null;
    const mask = document.createElement("canvas");
    mask.width = this.canvas.width;
    mask.height = this.canvas.height;
    const ctx = mask.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, mask.width, mask.height);
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(this.strokes, 0, 0);
    const blob = await new Promise((resolve) => mask.toBlob(resolve, "image/png"));
    return new File([blob], "mask.png", { type: "image/png" });
  }
}
