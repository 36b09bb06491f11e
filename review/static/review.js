// Deep-COVID review: zoom and pan, heatmap layers and opacity, window/level, and keyboard shortcuts.
// Plain JavaScript, no libraries; loaded on every page, active where its elements exist.
"use strict";

(function () {
  const viewer = document.getElementById("viewer");
  if (!viewer) {
    return;
  }
  const layers = document.getElementById("layers");
  const stage = document.getElementById("stage");
  const xray = document.getElementById("xray");
  const status = document.getElementById("heat-status");
  const view = { scale: 1, x: 0, y: 0 };

  function apply() {
    layers.style.transform = "translate(" + view.x + "px, " + view.y + "px) scale(" + view.scale + ")";
  }
  function zoom(factor) {
    view.scale = Math.min(16, Math.max(0.5, view.scale * factor));
    apply();
  }
  function reset() {
    view.scale = 1;
    view.x = 0;
    view.y = 0;
    apply();
  }
  document.getElementById("zoom-in").addEventListener("click", function () { zoom(1.25); });
  document.getElementById("zoom-out").addEventListener("click", function () { zoom(0.8); });
  document.getElementById("zoom-reset").addEventListener("click", reset);
  stage.addEventListener("wheel", function (event) {
    event.preventDefault();
    zoom(event.deltaY < 0 ? 1.1 : 1 / 1.1);
  }, { passive: false });
  let drag = null;
  stage.addEventListener("pointerdown", function (event) {
    drag = { x: event.clientX - view.x, y: event.clientY - view.y };
    stage.setPointerCapture(event.pointerId);
  });
  stage.addEventListener("pointermove", function (event) {
    if (drag) {
      view.x = event.clientX - drag.x;
      view.y = event.clientY - drag.y;
      apply();
    }
  });
  stage.addEventListener("pointerup", function () { drag = null; });

  // Heatmap layers: loaded when first shown (a map can take seconds to compute).
  const opacity = document.getElementById("opacity");
  function setOpacity() {
    if (!opacity) {
      return;
    }
    document.querySelectorAll("img.heat").forEach(function (img) {
      img.style.opacity = String(opacity.value / 100);
    });
  }
  function show(layer, on) {
    const img = document.getElementById("heat-" + layer);
    if (!img) {
      return;
    }
    if (on && !img.getAttribute("src")) {
      status.textContent = "Computing the " + layer + " heatmap…";
      img.setAttribute("src", img.dataset.src);
    }
    img.classList.toggle("on", on);
  }
  document.querySelectorAll("img.heat").forEach(function (img) {
    img.addEventListener("load", function () {
      img.classList.add("loaded");
      status.textContent = "";
    });
    img.addEventListener("error", function () {
      status.textContent = "No " + img.dataset.layer + " heatmap for this image.";
    });
  });
  document.querySelectorAll("input.layer-toggle").forEach(function (box) {
    box.addEventListener("change", function () { show(box.value, box.checked); });
    if (box.checked) {
      show(box.value, true);
    }
  });
  if (opacity) {
    opacity.addEventListener("input", setOpacity);
    setOpacity();
  }

  // Window/level: the server renders the image again through the chosen window.
  const form = document.getElementById("window-form");
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const wc = document.getElementById("wc").value;
    const ww = document.getElementById("ww").value;
    if (wc !== "" && ww !== "") {
      xray.setAttribute("src", xray.dataset.base + "?wc=" + encodeURIComponent(wc) + "&ww=" + encodeURIComponent(ww));
    }
  });
  document.getElementById("window-reset").addEventListener("click", function () {
    xray.setAttribute("src", xray.dataset.base);
  });

  // Keyboard: j/k next/previous, 1-4 verdicts, +/- zoom, 0 fit; never while typing a note or a number.
  document.addEventListener("keydown", function (event) {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) {
      return;
    }
    const typing = target && (target.tagName === "TEXTAREA" || target.tagName === "SELECT" ||
      (target.tagName === "INPUT" && !["range", "checkbox", "button", "submit"].includes(target.type)));
    if (typing) {
      return;
    }
    const go = function (id) {
      const link = document.getElementById(id);
      if (link) {
        window.location.assign(link.href);
      }
    };
    if (event.key === "j") {
      go("next");
    } else if (event.key === "k") {
      go("prev");
    } else if (event.key === "+" || event.key === "=") {
      zoom(1.25);
    } else if (event.key === "-") {
      zoom(0.8);
    } else if (event.key === "0") {
      reset();
    } else {
      const button = document.querySelector("#verdict-form button[data-key='" + event.key + "']");
      if (button) {
        event.preventDefault();
        button.click();
      }
    }
  });
})();
