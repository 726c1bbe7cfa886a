// Prepares a book page for the ipywidgets HTML manager (embed-amd.js).
// Loaded after require.js and before embed-amd.js on every page with widgets
// (nb_ipywidgets_js in _config.yml); build.sh copies it to _vendor/widgets/setup.js.
(function () {
  "use strict";
  // This script's folder, which also holds embed-amd.js and its fonts.
  var here = document.currentScript.src.replace(/[^/]*$/, "");

  // embed-amd.js finds its Font Awesome fonts next to the AMD module
  // "@jupyter-widgets/html-manager/dist/libembed-amd", whose URL RequireJS
  // would otherwise derive from the page's folder (and get a 404).
  window.requirejs.config({
    paths: { "@jupyter-widgets/html-manager/dist": here.replace(/\/$/, "") },
  });

  // The widgets typeset LaTeX in labels with MathJax 2's MathJax.Hub.Queue;
  // Sphinx loads MathJax 3, which has no Hub. Bridge the one call they make,
  // before embed-amd.js renders the widgets (its handler runs after this one).
  window.addEventListener("load", function () {
    var mj = window.MathJax;
    if (mj && !mj.Hub && typeof mj.typesetPromise === "function") {
      mj.Hub = {
        Queue: function (command) {
          // command is ["Typeset", MathJax.Hub, element]
          mj.typesetPromise([command[2]]).catch(function (err) {
            console.warn("MathJax could not typeset a widget label:", err);
          });
        },
      };
    }
  });
})();
