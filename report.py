"""What invert.py writes about a run besides the masks (Li et al., CVPR 2021, Sec. 3.3 and Tables 1-4).

    OUT/written.jsonl      every file the run wrote, listed before it was written (Written)
    OUT/metrics.csv, .json with --eval: DICE and Jaccard per image and class, mIoU, DICE per patient
    OUT/segmentations.csv  per image the trust signals and the flag (an image the generator cannot explain)
    OUT/index.html         a report to look at: every image with its overlay, scores and signals, worst first

Names go into every file as printable text, and into the CSV files as text a spreadsheet will not run as a
formula. Needs: losses.py and data.py; never the training scripts.
"""

import collections
import csv
import html
import json
import os
import time
import urllib.parse
from pathlib import Path

import numpy as np
import torch

import data
import losses


# ----------------------------------------------------------------------------------------------------
# The files a run writes: names that never clash, each listed before it is written


OUTPUT_SUFFIXES = {"mask": "", "color": "_color", "overlay": "_overlay", "recon": "_recon"}


def output_paths(out, name, reconstruction):
    """{kind: OUT/NAME{suffix}.png} of one input; the reconstruction only when it is saved."""
    base = Path(out) / name
    return {kind: base.with_name(base.name + suffix + ".png") for kind, suffix in OUTPUT_SUFFIXES.items()
            if kind != "recon" or reconstruction}


def name_outputs(inputs):
    """Give every input output names no other input's share. Where two would (scan.png and scan.jpg; or
    scan.png, whose colour image is scan_color.png, and an input scan_color.png), each input involved keeps
    its extension in its name (scan.png.png, scan.jpg.png; scan_color.png.png), and the run says so; a
    clash left after that (two files of one name in different places) is a DataError."""
    renamed = []
    for attempt in range(2):
        owners = collections.defaultdict(set)
        for k, item in enumerate(inputs):
            for suffix in OUTPUT_SUFFIXES.values():
                owners[item.name + suffix].add(k)
        clashing = sorted({k for ks in owners.values() if len(ks) > 1 for k in ks})
        if not clashing:
            break
        if attempt == 1:
            first, second = (inputs[k].path for k in clashing[:2])
            raise data.DataError(f"{first}: its outputs would have the names of those of {second}; segment them in "
                                 "separate runs (or pass their folder, whose sub-folders keep the names apart)")
        for k in clashing:
            inputs[k].name = inputs[k].key + inputs[k].path.suffix
        renamed = [inputs[k] for k in clashing]
    if renamed:
        example = ", ".join(data.printable(item.path.name) for item in renamed[:3])
        print(f"note: {len(renamed)} inputs would share output names ({example}{' ...' if len(renamed) > 3 else ''}): "
              f"their outputs keep the extension, as in {data.printable(renamed[0].name)}.png", flush=True)
    return inputs


def check_name_lengths(inputs, out):
    """Every output name must fit the file system's limit on a name (255 bytes on most): checked before the
    first image is segmented, not found out half way."""
    folder = next(p for p in (Path(out).absolute(), *Path(out).absolute().parents) if p.exists())
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf: its limit
        limit = 255
    longest = max(OUTPUT_SUFFIXES.values(), key=len) + ".png"
    for item in inputs:
        name = os.fsencode(Path(item.name).name + longest)
        if len(name) > limit:
            raise data.DataError(f"{item.path}: its output {Path(item.name).name}{longest} would be a name of "
                                 f"{len(name)} bytes, more than the file system takes ({limit}); give the image a "
                                 "shorter name")


REPORT_FILES = ("index.html", "segmentations.csv", "metrics.csv", "metrics.json")


class Written:
    """The files invert.py writes into --out, each listed in OUT/written.jsonl (a JSON string per line, its path
    inside OUT) before it is written. A later run into the same OUT replaces exactly what an earlier one listed
    (--overwrite removes those files first: no earlier mask or metrics.json stays beside the new report), never
    a file that is not listed: this tool did not write it."""

    LIST = "written.jsonl"

    def __init__(self, out):
        self.out, self.list, self.earlier = Path(out), Path(out) / self.LIST, set()
        if self.list.is_file():
            try:
                with open(self.list, encoding="utf-8") as f:
                    self.earlier = {json.loads(line) for line in f if line.strip()}
            except ValueError:  # not JSON, not UTF-8: not ours
                raise data.DataError(f"{self.list} is not the list of files invert.py keeps; pass another "
                                     "--out") from None

    def start(self, planned, overwrite):
        """Check `planned` against what is there, remove an earlier run's files (`overwrite`, else refuse), start
        the list afresh. Returns a note, or ''."""
        if self.out.exists() and not self.out.is_dir():
            raise data.DataError(f"--out {self.out} is a file; pass a folder (it is created if need be)")
        foreign = [p for p in planned if p.exists() and self.inside(p) not in self.earlier]
        if foreign:
            raise data.DataError(f"{foreign[0]} exists and was not written by invert.py (not in {self.list}); "
                                 "it is never replaced: pass another --out")
        present = sorted(n for n in self.earlier if (self.out / n).is_file())
        if present and not overwrite:
            raise data.DataError(f"--out {self.out} holds an earlier run's {len(present)} files (listed in "
                                 f"{self.list}): pass --overwrite to replace that run (its files are removed "
                                 "first), or another --out")
        for name in present:
            os.remove(self.out / name)
        self.out.mkdir(parents=True, exist_ok=True)
        self.list.write_text("", encoding="utf-8")
        return f"removed the earlier run's {len(present)} files from {data.printable(self.out)} (--overwrite)" \
            if present else ""

    def inside(self, path):
        return Path(path).relative_to(self.out).as_posix()

    def add(self, path):
        """List `path`; call before writing it."""
        with open(self.list, "a", encoding="utf-8") as f:
            f.write(json.dumps(self.inside(path)) + "\n")
        return path


def check_apart(out, reads):
    """--out must hold none of the files the run reads ((option, path) pairs; the images are checked as they
    are collected)."""
    for option, path in reads:
        if path and data.inside(path, out):
            raise data.DataError(f"--out {out} holds {option} {path}; pass an --out that holds none of the inputs")


def start(inputs, out, reconstruction, overwrite):
    """Before the first image: names for every input's outputs that clash with no other's and fit the file
    system, checked against what --out holds (an earlier run's files removed with `overwrite`). Returns the
    run's Written list."""
    inputs = name_outputs(inputs)
    check_name_lengths(inputs, out)
    written = Written(out)
    planned = [p for item in inputs for p in output_paths(out, item.name, reconstruction).values()]
    removed = written.start(planned + [Path(out) / name for name in REPORT_FILES], overwrite)
    if removed:
        print(removed, flush=True)
    return written


def spreadsheet_cell(text):
    """A name as a CSV cell that a spreadsheet shows as text: one that starts with =, +, -, @, a tab or a
    carriage return would be read as a formula, so it gets a leading ' (OWASP's advice on CSV injection)."""
    text = data.printable(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# ----------------------------------------------------------------------------------------------------
# Scores: the table on the console, metrics.csv and metrics.json


def summary_rows(results, class_names, steps):
    """The summary table as (column titles, rows of (label, values)): DICE and Jaccard of the optimised masks
    and of the encoder alone; None where a row has no Jaccard (mIoU, DICE per patient)."""
    kinds = [k for k in ("optimised", "encoder_only") if k in results]
    titles = {"optimised": f"{steps} steps", "encoder_only": "encoder"}
    columns = [f"{metric} {titles[k]}" for k in kinds for metric in ("DICE", "Jaccard")]
    rows = []
    for name in class_names[1:] + ["mean"]:
        rows.append((name, [v for k in kinds for v in
                            ((results[k]["mean_dice"], results[k]["mean_jaccard"]) if name == "mean"
                             else (results[k]["dice"][name], results[k]["jaccard"][name]))]))
    rows.append(("mIoU", [v for k in kinds for v in (results[k]["miou"], None)]))
    if "dice_per_patient" in results[kinds[0]]:
        rows.append((f"DICE per patient ({results[kinds[0]]['patients']} patients)",
                     [v for k in kinds for v in (results[k]["dice_per_patient"], None)]))
    return columns, rows


def print_table(results, class_names, steps):
    """summary_rows on the console."""
    columns, rows = summary_rows(results, class_names, steps)
    width = max(14, max(len(n) for n in class_names))
    print(f"{'':<{width}}" + "".join(f"{c:>{18 if c.startswith('DICE') else 21}}" for c in columns))
    for name, values in rows:
        label, patients = name, ""
        if name.startswith("DICE per patient"):  # the patient count after the row, to keep the columns narrow
            label, patients = "DICE/patient", "  " + name[len("DICE per patient "):]
        cells = "".join(f"{'' if v is None else f'{v:.4f}':>{18 if i % 2 == 0 else 21}}" for i, v in enumerate(values))
        print(f"{label:<{width}}{cells}{patients}")


def write_metrics(out, scores, results, class_names, argv, model_path, steps, images, written):
    with open(written.add(Path(out) / "metrics.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        kinds = [(k, prefix) for k, prefix in (("optimised", ""), ("encoder_only", "encoder_")) if k in scores]
        header = ["name", "patient"] + [f"{prefix}{metric}_{class_names[c]}" for _, prefix in kinds
                                        for c in range(1, len(class_names)) for metric in ("dice", "jaccard")]
        writer.writerow(header)
        for name in scores["optimised"].rows:
            row = [spreadsheet_cell(name), spreadsheet_cell(data.patient_id(name) or "")]
            for kind, _ in kinds:
                for c in range(1, len(class_names)):
                    row += [f"{v:.6f}" for v in scores[kind].rows[name][c]]
            writer.writerow(row)
    summary = {"command": data.printable(" ".join(argv)), "model": data.printable(model_path), "steps": steps,
               "images": images, "classes": class_names, **results}
    with open(written.add(Path(out) / "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


# ----------------------------------------------------------------------------------------------------
# Trust signals: how well the generator explains each image (segmentations.csv and the report): the final
# reconstruction's LPIPS and MSE and the encoder's, error_ratio (the encoder's LPIPS or MSE over the labeled training
# images' largest, stored in model.pt by stage 2: how far the image is out of the generator's reach), how far the
# optimisation moved the mask (agreement_miou, the encoder's mask against the optimised one at the model's
# resolution; 1 with --steps 0) and each class's share of the mask.
#
# The flag is the agreement: an image whose mask the optimisation moved further than it moved any of the held-out
# images model.pt holds (invert.flag_limit inverts them with the run's own settings). Of the signals it alone ranks
# the bad masks of another source's images as well as in domain (docs/flag.md: AUROC for "DICE in the set's worst
# tenth"); error_ratio rises for every foreign image, good mask or bad.


LABELED_ERRORS_MAX = 256  # labeled images measured for error_ratio's reference, the first in the data's order


@torch.no_grad()
def labeled_errors(E, G, percept, dataset, batch, device):
    """error_ratio's reference, which train_encoder.py stores in model.pt: the encoder's reconstruction errors of
    the labeled training images, as invert.py measures a new image's at its step 0 (E in eval mode, fp32, 256 px
    at most; G's fixed noise maps where invert.py draws each image's own). {"lpips_net", "lpips", "mse"}."""
    was_training = E.training
    E.eval()
    count, lpips_values, mses = min(LABELED_ERRORS_MAX, len(dataset)), [], []
    for start in range(0, count, batch):  # no DataLoader: it would draw from the global RNG, which a resume restores
        images = torch.stack([dataset[i][0] for i in range(start, min(start + batch, count))]).to(device)
        reconstruction, _ = G(E(images), input_is_w=True, randomize_noise=False)
        lpips_value, mse = losses.reconstruction_errors(percept, reconstruction, images)
        lpips_values += lpips_value.tolist()
        mses += mse.tolist()
    E.train(was_training)
    return {"lpips_net": percept.net, "lpips": lpips_values, "mse": mses}


def error_reference(bundle, lpips_net):
    """The largest LPIPS and the largest MSE of the labeled training images' encoder reconstructions, from
    model.pt; None for a model.pt written before they were stored, or measured with another LPIPS network than
    this run's (distances of different backbones do not compare)."""
    stored = bundle.get("labeled_errors")
    if not stored or stored["lpips_net"] != lpips_net:
        return None
    return max(stored["lpips"]), max(stored["mse"])


def error_ratio(encoder_lpips, encoder_mse, reference):
    """How many times the labeled images' largest error the image's encoder error is (LPIPS or MSE, the larger)."""
    return max(encoder_lpips / max(reference[0], 1e-12), encoder_mse / max(reference[1], 1e-12))


def trust_signals(name, classes, agreed, errors, num_labels, reference, limit):
    """One row of segmentations.csv (a dict): the errors (final LPIPS, MSE, the encoder's LPIPS, MSE), error_ratio
    (None without a reference), the agreement of the two masks (invert.mask_agreements), the foreground classes'
    areas in the mask `classes`, and the flag: agreement below `limit` (None without one)."""
    lpips_value, mse, encoder_lpips, encoder_mse = (float(e) for e in errors)
    areas = np.bincount(classes.ravel(), minlength=num_labels)[1:num_labels] / classes.size
    return {"name": name, "flagged": None if limit is None else agreed < limit,
            "error_ratio": error_ratio(encoder_lpips, encoder_mse, reference) if reference else None,
            "encoder_lpips": encoder_lpips, "encoder_mse": encoder_mse, "lpips": lpips_value, "mse": mse,
            "agreement_miou": agreed, "areas": areas.tolist()}


def flag_summary(rows, limit, why_not):
    """The line that says how many images are flagged and by which rule (or why none can be)."""
    if limit is None:
        return f"no image is flagged: {why_not}"
    flagged = sum(bool(r["flagged"]) for r in rows)
    return (f"flagged: {flagged} of {len(rows)} images, whose masks the optimisation moved further than any held-out "
            f"image's (agreement mIoU of the encoder's and the optimised mask below {limit:.4f})")


SIGNALS = ("error_ratio", "encoder_lpips", "encoder_mse", "lpips", "mse", "agreement_miou")


def write_segmentations(out, rows, class_names, written):
    """OUT/segmentations.csv: a row per image in the order segmented; flagged 1 or 0 (empty when there is no
    flag), error_ratio empty when the model holds no reference."""
    with open(written.add(Path(out) / "segmentations.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "flagged", *SIGNALS] + [f"area_{n}" for n in class_names[1:]])
        for row in rows:
            flagged = "" if row["flagged"] is None else int(row["flagged"])
            signals = ["" if row[k] is None else f"{row[k]:.6f}" for k in SIGNALS]
            writer.writerow([spreadsheet_cell(row["name"]), flagged, *signals] + [f"{a:.6f}" for a in row["areas"]])


# ----------------------------------------------------------------------------------------------------
# The report: OUT/index.html, one page without scripts that opens from the file system; thumbnails are
# the files already there, linked by relative paths (the inputs' too: moved without them, those break)

REPORT_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; vertical-align: middle; }
th { background: #f2f2f2; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
td.picture { padding: 2px; }
img { height: 96px; image-rendering: pixelated; display: block; }
tr.flagged td { background: #fde0dc; }
.flag { font-weight: bold; color: #b3261e; }
"""


REPORT_LEGEND = ("error ratio: the encoder's reconstruction error G_x(E(x)) against x, LPIPS or MSE (the larger "
                 "ratio), over the largest of the labeled training images' (high: out of the generator's reach). "
                 "LPIPS, MSE: the final reconstruction's. agreement mIoU: the encoder's mask against the optimised "
                 "one, at the model's resolution (1: the optimisation changed nothing); an image is flagged below "
                 "the limit the flag line names. area: each class's share of the pixels.")


def link(path, out):
    """A URL from OUT/index.html to `path`: relative, quoted; an absolute file URL where there is no
    relative path (another drive)."""
    try:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    except ValueError:
        return Path(os.path.abspath(path)).as_uri()
    return urllib.parse.quote(os.fsencode(Path(relative).as_posix()))  # bytes: a name that is not UTF-8 too


def worst_first(rows, scores):
    """The rows sorted worst first, and by what: the optimised mask's mean DICE (lowest first) with --eval, else
    the flag's agreement (lowest first), else error_ratio (the encoder's LPIPS without a reference), highest first."""
    if scores is not None:
        per_image = scores["optimised"].rows
        mean_dice = {name: float(np.mean([dice for dice, _ in row.values()])) for name, row in per_image.items()}
        return sorted(rows, key=lambda r: (mean_dice[r["name"]], r["name"])), "mean DICE, lowest first"
    if rows and rows[0]["flagged"] is not None:  # the flag's order: the flagged first
        return sorted(rows, key=lambda r: (r["agreement_miou"], r["name"])), "agreement mIoU, lowest first"
    if rows and rows[0]["error_ratio"] is not None:
        return sorted(rows, key=lambda r: (-r["error_ratio"], r["name"])), "error ratio, highest first"
    return sorted(rows, key=lambda r: (-r["encoder_lpips"], r["name"])), "encoder LPIPS, highest first"


def summary_html(results, class_names, steps):
    """The table print_table prints, as HTML."""
    columns, rows = summary_rows(results, class_names, steps)
    lines = ["<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for name, values in rows:
        cells = "".join("<td></td>" if v is None else f"<td>{v:.4f}</td>" for v in values)
        lines.append(f"<tr><td class='text'>{html.escape(name)}</td>{cells}</tr>")
    return "<table>\n" + "\n".join(lines) + "\n</table>"


def report_settings(r, flags):
    """(label, text) pairs for the top of the report: what ran (invert.run's namespace `r`), and the flag."""
    args, images = r.args, f"{len(r.rows)} segmented"
    if r.skipped:
        images += f"; {len(r.skipped)} unreadable file(s) skipped: {', '.join(str(p) for p in r.skipped[:5])}"
    return [("command", " ".join(r.argv)),
            ("model", f"{r.model_path} (step {r.bundle.get('step')}, {r.bundle['preprocessing']['resolution']} px, "
                      f"{r.bundle['num_classes']} classes)"),
            ("inversion", f"{args.steps} steps, lr {args.lr}, weights LPIPS {args.lpips_weight}, MSE "
                          f"{args.mse_weight}, encoder {args.encoder_weight}, noise {args.noise_weight}"
                          f"{'' if args.optimize_noise else ' (noise maps fixed)'}; LPIPS {r.lpips_net}; "
                          f"seed {args.seed}; {r.precision}"),
            ("images", images), ("flag", flags), ("written", time.strftime("%Y-%m-%d %H:%M:%S %z"))]


def number_cell(key, value):
    return f"<td data-key='{html.escape(key, quote=True)}'>{'' if value is None else f'{value:.4f}'}</td>"


def picture_cell(path, out, what, name):
    url, alt = html.escape(link(path, out), quote=True), html.escape(f"{what} of {data.printable(name)}", quote=True)
    return f"<td class='picture'><a href='{url}'><img src='{url}' alt='{alt}' loading='lazy'></a></td>"


def write_report(out, rows, files, scores, class_names, settings, summary, steps, written):
    """OUT/index.html: the settings and the summary table at the top, then a row per image, worst first:
    input | overlay | reconstruction (when saved), with --eval each class's DICE of the optimised mask and of
    the encoder's, then the trust signals; flagged rows marked. `files`: {name: (input path, output paths)}."""
    rows, order = worst_first(rows, scores)
    kinds = [(k, prefix, title) for k, prefix, title in (("optimised", "", f"{steps} steps"),
                                                          ("encoder_only", "encoder_", "encoder"))
             if scores is not None and k in scores]
    recon = any("recon" in files[r["name"]][1] for r in rows)
    foreground = class_names[1:]
    header = (["#", "name", "input", "overlay"] + (["reconstruction"] if recon else [])
              + [f"DICE {c} ({title})" for c in foreground for _, _, title in kinds]
              + ["flagged", "error ratio", "encoder LPIPS", "encoder MSE", "LPIPS", "MSE", "agreement mIoU"]
              + [f"area {c}" for c in foreground])
    lines = ["<tr>" + "".join(f"<th{' class=text' if h == 'name' else ''}>{html.escape(h)}</th>" for h in header)
             + "</tr>"]
    for position, row in enumerate(rows, start=1):
        name, (source, paths) = row["name"], files[row["name"]]
        cells = [f"<td>{position}</td>", f"<td class='text' data-key='name'>{html.escape(data.printable(name))}</td>",
                 picture_cell(source, out, "input", name), picture_cell(paths["overlay"], out, "overlay", name)]
        if recon:
            cells.append(picture_cell(paths["recon"], out, "reconstruction", name) if "recon" in paths else "<td></td>")
        for c in range(1, len(class_names)):
            cells += [number_cell(f"{prefix}dice_{class_names[c]}", scores[k].rows[name][c][0])
                      for k, prefix, _ in kinds]
        flag = {None: "", True: "<span class='flag'>yes</span>", False: "no"}[row["flagged"]]
        cells.append(f"<td data-key='flagged'>{flag}</td>")
        cells += [number_cell(key, row[key]) for key in SIGNALS]
        cells += [number_cell(f"area_{c}", a) for c, a in zip(foreground, row["areas"])]
        marked = " class='flagged'" if row["flagged"] else ""
        lines.append(f"<tr{marked} data-name='{html.escape(data.printable(name), quote=True)}'>" + "".join(cells)
                     + "</tr>")
    page = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
            f"<title>Segmentations in {html.escape(data.printable(out))}</title><style>{REPORT_STYLE}</style>",
            f"</head><body><h1>Segmentations: {len(rows)} images</h1>", "<table>"]
    page += [f"<tr><th class='text'>{html.escape(k)}</th><td class='text'>{html.escape(data.printable(v))}</td></tr>"
             for k, v in settings]
    page += ["</table>"] + (["<h2>Scores</h2>", summary] if summary else [])
    page += [f"<h2>Per image, worst first (by {order})</h2>", f"<p>{REPORT_LEGEND}</p>", "<table>", *lines,
             "</table>", "</body></html>"]
    with open(written.add(Path(out) / "index.html"), "w", encoding="utf-8") as f:
        f.write("\n".join(page) + "\n")


# ----------------------------------------------------------------------------------------------------
# All of it, for the images done


def write_summaries(r):
    """The table, metrics.*, segmentations.csv and the report for the images done (`r`: invert.run's
    namespace); returns the last line."""
    args, done = r.args, len(r.rows)
    summary = f"done: {done} images segmented into {data.printable(args.out)} in {time.time() - r.start:.1f} s"
    results = None
    if r.scores["optimised"].rows:  # with --eval
        results = {k: s.summary(r.class_names) for k, s in r.scores.items()}
        print_table(results, r.class_names, args.steps)
        write_metrics(args.out, r.scores, results, r.class_names, r.argv, r.model_path, args.steps, done, r.written)
        summary += "; metrics.csv and metrics.json written"
    if done:
        flags = flag_summary(r.rows, r.limit, r.why_not)
        if r.limit is not None:
            print(flags, flush=True)
        write_segmentations(args.out, r.rows, r.class_names, r.written)
        write_report(args.out, r.rows, r.files, r.scores if results else None, r.class_names, report_settings(r, flags),
                     summary_html(results, r.class_names, args.steps) if results else "", args.steps, r.written)
        summary += f"; segmentations.csv and the report {data.printable(Path(args.out) / 'index.html')} written"
    if r.skipped:
        summary += f"; skipped {len(r.skipped)} unreadable file(s), the first {data.printable(r.skipped[0])}"
    return summary
