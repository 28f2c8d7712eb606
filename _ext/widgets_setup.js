// Loaded on pages with widgets, between require.js and embed-amd.js (see nb_ipywidgets_js in
// _config.yml). `make widgets-js` copies it to _static/widgets/ beside them.
(function () {
  // 1. The widget modules (all bundled in embed-amd.js) find their own files, the Font
  //    Awesome fonts, through the RequireJS path of their module name; by default that is
  //    relative to the page, where there are none. Point both names at the folder this
  //    script was loaded from, so icons load offline from every page.
  var script = document.currentScript;
  if (script && script.src && typeof window.require === "function") {
    var dir = script.src.replace(/[?#].*$/, "").replace(/\/[^/]*$/, "");
    window.require.config({
      paths: { "@jupyter-widgets": dir, "@jupyter-widgets/html-manager/dist": dir },
    });
  }

  // 2. Widget labels are typeset with MathJax 2's MathJax.Hub.Queue; the book loads MathJax 3
  //    (deferred, so it is there by DOMContentLoaded; widgets render later, on load).
  document.addEventListener("DOMContentLoaded", function () {
    var mj = window.MathJax;
    if (mj && !mj.Hub && mj.startup) {
      mj.Hub = {
        Queue: function (job) {
          var element = job[2];
          mj.startup.promise.then(function () {
            return mj.typesetPromise([element]);
          });
        },
      };
    }
  });
})();
