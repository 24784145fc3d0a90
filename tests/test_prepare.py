"""`python prepare.py NAME SRC OUT`: each converter on a tiny replica of its release's layout, written
here, with the outputs checked against what the test knows: names, counts, class ids, pixel values.
Also the JSRT .IMG reader on files this test writes byte by byte, and the NIfTI and DICOM volumes of the
liver sets, written here with nibabel and pydicom in other orientations than the canonical one. Those two
packages are optional (only the lits and chaos converters need them): the tests that write volumes skip
themselves without them, the others run."""
import hashlib
import sys

import numpy as np
import pytest
from PIL import Image

import data
import prepare
from test_data import assert_one_error_line, run_main, save

# ----------------------------------------------------------------------------------------------------
# Helpers


def run_prepare(capsys, argv):
    """prepare.main(argv): (exit status, stdout, stderr)."""
    return run_main(capsys, argv, prepare.main)


def convert(capsys, name, src, out, *extra):
    code, stdout, stderr = run_prepare(capsys, [name, src, out, *extra])
    assert code == 0, stderr
    return stdout


def read(path):
    return np.asarray(Image.open(path))


def written(out, folder="images"):
    return sorted(p.stem for p in (out / folder).glob("*.png"))


def blob_mask(shape, top, left, height, width):
    mask = np.zeros(shape, np.uint8)
    mask[top:top + height, left:left + width] = 255
    return mask


def rgb_noise(size, seed):
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# Faces


def test_celebamask_original_release_paints_parts_in_order_and_merges_to_8(capsys, tmp_path):
    src, out = tmp_path / "CelebAMask-HQ", tmp_path / "out"
    for i in (0, 1, 2):
        save(src / "CelebA-HQ-img" / f"{i}.jpg", rgb_noise(16, i))
    anno = src / "CelebAMask-HQ-mask-anno" / "0"
    parts = {"skin": blob_mask((8, 8), 0, 0, 8, 8), "hair": blob_mask((8, 8), 0, 0, 2, 8),
             "l_eye": blob_mask((8, 8), 3, 1, 1, 2), "eye_g": blob_mask((8, 8), 3, 0, 1, 8),
             "u_lip": blob_mask((8, 8), 6, 3, 1, 2), "neck": blob_mask((8, 8), 7, 0, 1, 8),
             "hat": blob_mask((8, 8), 0, 6, 1, 2), "r_ear": blob_mask((8, 8), 4, 7, 2, 1)}
    for part, mask in parts.items():
        save(anno / f"00000_{part}.png", np.stack([mask] * 3, -1))  # the release's PNGs are RGB
    save(anno / "00001_nose.png", blob_mask((8, 8), 2, 2, 3, 3))
    stdout = convert(capsys, "celebamask", src, out)
    assert "wrote 2 labeled pairs" in stdout and "left out 1 images without a mask" in stdout
    assert written(out) == written(out, "masks") == ["0", "1"]
    assert (out / "classes.txt").read_text().split() == list(data.FACE8_CLASSES)
    mask = read(out / "masks/0.png")
    eight = {name: i for i, name in enumerate(data.FACE8_CLASSES)}
    expected = np.full((8, 8), eight["skin"])
    expected[0:2, :] = eight["hair"]          # hair is painted after skin
    expected[3, :] = eight["background"]      # eye_g merges into background ...
    expected[3, 1:3] = eight["eyes"]          # ... and l_eye, painted after it, wins
    expected[4:6, 7] = eight["ears"]
    expected[6, 3:5] = eight["mouth"]         # u_lip
    expected[7, :] = eight["skin"]            # neck
    expected[0, 6:8] = eight["background"]    # hat, painted after hair
    assert np.array_equal(mask, expected)
    assert read(out / "images/0.png").shape == (8, 8, 3)  # the image goes onto the masks' grid
    assert np.array_equal(read(out / "masks/1.png"), np.where(blob_mask((8, 8), 2, 2, 3, 3) > 0, eight["nose"], 0))


def test_celebamask19_index_maps_merge_to_8(capsys, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    values = np.arange(19, dtype=np.uint8).reshape(1, 19).repeat(3, 0)
    save(src / "CelebA-HQ-img/7.jpg", rgb_noise(19, 0)[:3])
    save(src / "CelebAMask-HQ-mask/7.png", values)
    convert(capsys, "celebamask19", src, out)
    assert read(out / "masks/7.png")[0].tolist() == [data.CELEBAMASK19_TO_8[v] for v in range(19)]
    save(src / "CelebAMask-HQ-mask/7.png", np.full((3, 19), 19, np.uint8))
    code, _, err = run_prepare(capsys, ["celebamask19", src, tmp_path / "out2"])
    assert_one_error_line(code, err, "7.png", "not one of the 19")


def test_metfaces40_reads_index_and_colour_labels(capsys, tmp_path):
    src, out = tmp_path / "metfaces40", tmp_path / "out"
    index = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.uint8)
    save(src / "image/a.png", rgb_noise(4, 1)[:2])
    save(src / "label/a.png", index)
    save(src / "image/b.png", rgb_noise(4, 2)[:2])
    save(src / "label/b.png", np.array(prepare.FACE8_COLOURS, np.uint8)[index])
    convert(capsys, "metfaces40", src, out)
    assert np.array_equal(read(out / "masks/a.png"), index)
    assert np.array_equal(read(out / "masks/b.png"), index)


# ----------------------------------------------------------------------------------------------------
# Chest X-ray


def write_jsrt(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.asarray(values, ">u2").tobytes())


def test_jsrt_inverts_averages_and_merges_the_lungs(capsys, tmp_path):
    src, out = tmp_path / "jsrt", tmp_path / "out"
    raw = np.zeros((16, 16), np.uint16)
    raw[:, :8] = 4095  # dark on a usual display: stored high
    raw[:, 8:] = 1000
    raw[0:2, 0:2] = [[0, 4095], [4095, 4095]]  # one 2 x 2 block averages to 3071.25
    write_jsrt(src / "images/JPCLN001.IMG", raw)
    write_jsrt(src / "images/JPCNN010.IMG", raw)  # no SCR masks: left out, counted
    left, right = blob_mask((8, 8), 1, 1, 5, 2), blob_mask((8, 8), 1, 5, 5, 2)
    save(src / "scr/fold1/masks/left lung/JPCLN001.gif", left)
    save(src / "scr/fold1/masks/right lung/JPCLN001.gif", Image.fromarray(right).convert("P"))
    stdout = convert(capsys, "jsrt", src, out)
    assert "wrote 1 labeled pairs" in stdout and "left out 1 images without a mask" in stdout
    image, mask = read(out / "images/JPCLN001.png"), read(out / "masks/JPCLN001.png")
    assert image.shape == mask.shape == (8, 8)
    assert np.array_equal(mask, ((left > 0) | (right > 0)).astype(np.uint8))
    assert image[1, 0] == 0 and image[0, 7] == round((4095 - 1000) * 255 / 4095)
    assert image[0, 0] == round((4095 - 3071.25) * 255 / 4095)
    # without any SCR mask the images are an unlabeled set
    stdout = convert(capsys, "jsrt", src / "images", tmp_path / "unlabeled")
    assert "2 unlabeled images" in stdout and written(tmp_path / "unlabeled") == ["JPCLN001", "JPCNN010"]
    assert read(tmp_path / "unlabeled/images/JPCLN001.png").shape == (16, 16)


def test_jsrt_reader_rejects_a_file_of_the_wrong_length(tmp_path):
    (tmp_path / "x.IMG").write_bytes(b"\0" * 1000)
    with pytest.raises(data.DataError, match="not a square of 16-bit pixels"):
        prepare.read_jsrt(tmp_path / "x.IMG")


def test_montgomery_merges_left_and_right_masks(capsys, tmp_path):
    src, out = tmp_path / "MontgomerySet", tmp_path / "out"
    save(src / "CXR_png/MCUCXR_0001_0.png", np.full((10, 8), 100, np.uint8))
    left, right = blob_mask((10, 8), 1, 1, 6, 2), blob_mask((10, 8), 2, 5, 6, 2)
    save(src / "ManualMask/leftMask/MCUCXR_0001_0.png", left)
    save(src / "ManualMask/rightMask/MCUCXR_0001_0.png", right)
    convert(capsys, "nlm", src, out)
    assert np.array_equal(read(out / "masks/MCUCXR_0001_0.png"), ((left | right) > 0).astype(np.uint8))
    assert read(out / "images/MCUCXR_0001_0.png").shape == (10, 8)  # not squared unless --size
    convert(capsys, "montgomery", src, tmp_path / "sq", "--size", 5)
    assert read(tmp_path / "sq/masks/MCUCXR_0001_0.png").shape == (5, 5)


def test_shenzhen_matches_name_mask_files_and_counts_the_rest(capsys, tmp_path):
    src, out = tmp_path / "data/masks_everywhere/shenzhen", tmp_path / "out"  # folder names above SRC never count
    for i in range(3):
        save(src / f"ChinaSet_AllFiles/CXR_png/CHNCXR_000{i}_0.png", np.full((6, 6), 10 * i, np.uint8))
    save(src / "mask/CHNCXR_0000_0_mask.png", blob_mask((6, 6), 1, 1, 3, 3))
    save(src / "mask/CHNCXR_0002_0_mask.png", blob_mask((6, 6), 0, 0, 2, 2))
    stdout = convert(capsys, "sz", src, out)
    assert "wrote 2 labeled pairs" in stdout and "left out 1 images without a mask" in stdout
    assert written(out) == ["CHNCXR_0000_0", "CHNCXR_0002_0"]
    assert read(out / "masks/CHNCXR_0002_0.png").sum() == 4
    assert (read(out / "images/CHNCXR_0002_0.png") == 20).all()


def test_nih_images_and_masks_folders(capsys, tmp_path):
    src, out = tmp_path / "NIH", tmp_path / "out"
    save(src / "images/00000001_000.png", np.full((6, 6), 50, np.uint8))
    save(src / "masks/00000001_000.png", blob_mask((6, 6), 2, 2, 2, 2) // 255)  # 0 / 1 masks work too
    convert(capsys, "nih", src, out)
    assert read(out / "masks/00000001_000.png").sum() == 4


def test_chestxray14_writes_grey_images_from_nested_folders(capsys, tmp_path):
    src, out = tmp_path / "cxr14", tmp_path / "out"
    save(src / "images_001/images/00000001_000.png", np.full((8, 8), 77, np.uint8))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 120, 255
    save(src / "images_002/images/00000002_001.png", rgba)  # some ChestX-ray14 images are RGBA
    stdout = convert(capsys, "chestxray14", src, out)
    assert "2 unlabeled images" in stdout and not (out / "masks").exists()
    assert (read(out / "images/00000002_001.png") == 120).all()
    assert Image.open(out / "images/00000002_001.png").mode == "L"
    labeled, unlabeled, info = data.build_datasets(_args(out))
    assert labeled is None and len(unlabeled) == 2 and info["channels"] == 1


def test_chestxray14_refuses_a_labeled_folder_named_otherwise(capsys, tmp_path):
    src = tmp_path / "JSRT"  # a labeled folder: its masks must not become X-rays of the pool
    save(src / "images/JPCLN001.png", np.full((8, 8), 77, np.uint8))
    save(src / "masks/JPCLN001.png", blob_mask((8, 8), 2, 2, 4, 4) // 255)
    code, _, err = run_prepare(capsys, ["chestxray14", src, tmp_path / "out"])
    assert_one_error_line(code, err, "JPCLN001.png", "NNNNNNNN_NNN.png", "is this the ChestX-ray14 release?")
    assert not (tmp_path / "out").exists()


def test_chestxray14_takes_only_its_names_and_counts_the_others(capsys, tmp_path):
    src, out = tmp_path / "cxr14", tmp_path / "out"
    save(src / "images/00000001_000.png", np.full((8, 8), 77, np.uint8))
    save(src / "images/00000001_000_mask.png", blob_mask((8, 8), 2, 2, 4, 4))
    save(src / "images/0000001_000.png", np.full((8, 8), 9, np.uint8))  # 7 digits
    save(src / "other/JPCLN001.png", np.full((8, 8), 5, np.uint8))
    stdout = convert(capsys, "chestxray14", src, out)
    assert written(out) == ["00000001_000"]
    assert "1 unlabeled images" in stdout and "left out 3 PNGs not named like ChestX-ray14's NNNNNNNN_NNN.png" in stdout
    save(src / "images/00000002_000.png", rgb_noise(8, 0))  # a colour image among them
    code, _, err = run_prepare(capsys, ["chestxray14", src, tmp_path / "out2"])
    assert_one_error_line(code, err, "00000002_000.png", "a colour image; chest X-rays are grey")


def face_like(src, image, mask):
    """A folder in the nih layout holding `image` and `mask` for two names."""
    for name in ("0", "1"):
        save(src / f"images/{name}.png", image)
        save(src / f"masks/{name}.png", mask)
    return src


def test_nih_refuses_face_images_and_class_index_masks(capsys, tmp_path):
    face_mask = (np.arange(19 * 19) % 19).astype(np.uint8).reshape(19, 19)  # values 0..18, a face's parts
    grey, binary = np.full((19, 19), 90, np.uint8), blob_mask((19, 19), 4, 4, 9, 9)
    faces = face_like(tmp_path / "faces", rgb_noise(19, 0), face_mask)
    grey_faces = face_like(tmp_path / "grey", grey, face_mask)
    colour_lungs = face_like(tmp_path / "colour", rgb_noise(19, 1), binary)
    for src, expected in ((faces, ["is SRC the nih release?"]),
                          (grey_faces, ["0.png", "holds 19 values 0..18", "a lung mask of the nih release has two"]),
                          (colour_lungs, ["0.png", "a colour image; chest X-rays are grey: is SRC the nih release?"])):
        code, _, err = run_prepare(capsys, ["nih", src, tmp_path / "out"])
        assert_one_error_line(code, err, *expected)
        assert not (tmp_path / "out/images").exists()  # refused before the first image is written
    save(tmp_path / "unlabeled/images/0.png", rgb_noise(19, 2))
    code, _, err = run_prepare(capsys, ["nih", tmp_path / "unlabeled", tmp_path / "out"])
    assert_one_error_line(code, err, "0.png", "a colour image")
    jsrt = tmp_path / "jsrt"  # jsrt's GIF masks get the same check
    write_jsrt(jsrt / "JPCLN001.IMG", np.zeros((38, 38)))
    save(jsrt / "left lung/JPCLN001.gif", face_mask)
    save(jsrt / "right lung/JPCLN001.gif", face_mask)
    code, _, err = run_prepare(capsys, ["jsrt", jsrt, tmp_path / "out"])
    assert_one_error_line(code, err, "JPCLN001.gif", "holds 19 values 0..18", "is SRC the jsrt release?")


def test_binary_mask_with_an_anti_aliased_edge_is_accepted(capsys, tmp_path):
    src, out = tmp_path / "NIH", tmp_path / "out"
    mask = blob_mask((20, 20), 5, 5, 10, 10)
    mask[4, 5:9] = 128  # 4 of 400 pixels (1%) between 0 and 255
    save(src / "images/00000001_000.png", np.full((20, 20), 50, np.uint8))
    save(src / "masks/00000001_000.png", mask)
    convert(capsys, "nih", src, out)
    assert np.array_equal(read(out / "masks/00000001_000.png"), (mask > 0).astype(np.uint8))
    mask[4, 9] = 128  # one more: 5 pixels, over 1%
    save(src / "masks/00000001_000.png", mask)
    code, _, err = run_prepare(capsys, ["nih", src, tmp_path / "out2"])
    assert_one_error_line(code, err, "00000001_000.png", "holds 3 values 0..255")


def _args(folder, *extra):
    import argparse
    parser = argparse.ArgumentParser()
    data.add_data_args(parser)
    return parser.parse_args(["--data", str(folder), *map(str, extra)])


# ----------------------------------------------------------------------------------------------------
# Skin lesions


def test_isic2018_pairs_segmentation_files(capsys, tmp_path):
    src, out = tmp_path / "isic", tmp_path / "out"
    for i in range(3):
        save(src / f"ISIC2018_Task1-2_Training_Input/ISIC_000000{i}.jpg", rgb_noise(8, i)[:6])
    save(src / "ISIC2018_Task1-2_Training_Input/ISIC_0000000_superpixels.png", np.zeros((6, 8, 3), np.uint8))
    save(src / "ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png", blob_mask((6, 8), 1, 1, 2, 3))
    save(src / "ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png", blob_mask((6, 8), 0, 0, 6, 8))
    stdout = convert(capsys, "isic2018", src, out)
    assert written(out) == ["ISIC_0000000", "ISIC_0000001"] and "left out 1 images without a mask" in stdout
    assert read(out / "masks/ISIC_0000000.png").sum() == 6 and read(out / "masks/ISIC_0000001.png").min() == 1
    assert (out / "classes.txt").read_text().split() == ["background", "lesion"]
    labeled, _, info = data.build_datasets(_args(out, "--resolution", 8, "--no-augment"))
    assert info["num_classes"] == 2 and info["channels"] == 3 and labeled[0][1].shape == (8, 8)


def test_ph2_layout(capsys, tmp_path):
    src, out = tmp_path / "PH2Dataset/PH2 Dataset images", tmp_path / "out"
    for name in ("IMD002", "IMD003"):
        save(src / name / f"{name}_Dermoscopic_Image/{name}.bmp", rgb_noise(6, 0))
        save(src / name / f"{name}_lesion/{name}_lesion.bmp", blob_mask((6, 6), 1, 1, 4, 4))
        save(src / name / f"{name}_roi/{name}_R1_Label.bmp", np.zeros((6, 6), np.uint8))
    convert(capsys, "ph2", src.parent, out)
    assert written(out) == ["IMD002", "IMD003"] and read(out / "masks/IMD003.png").sum() == 16
    assert np.array_equal(read(out / "images/IMD002.png"), rgb_noise(6, 0))


@pytest.mark.parametrize("name,folder", [("dermquest", "dermquest"), ("dermis", "dermIS")])
def test_waterloo_skin_sets(capsys, tmp_path, name, folder):
    src, out = tmp_path / "skin_data", tmp_path / "out"
    for kind in ("melanoma", "notmelanoma"):
        for other in ("dermquest", "dermIS"):
            save(src / kind / other / "1_orig.jpg", rgb_noise(6, 3))
            save(src / kind / other / "1_contour.png", blob_mask((6, 6), 0, 0, 3, 3) // 255)
    save(src / "melanoma" / folder / "2_orig.jpg", rgb_noise(6, 4))
    stdout = convert(capsys, name, src, out)
    assert "wrote 2 labeled pairs" in stdout and "left out 1 images without a mask" in stdout
    assert written(out) == ["melanoma_1", "notmelanoma_1"] and read(out / "masks/melanoma_1.png").sum() == 9


# ----------------------------------------------------------------------------------------------------
# Liver: NIfTI (LiTS) and DICOM (CHAOS)


def write_nifti(path, array, affine=None, slope=None, intercept=None, kind="Nifti1Image"):
    """A NIfTI file written by nibabel (`kind`: Nifti1Image, Nifti2Image or Nifti1Pair for .hdr/.img)."""
    nibabel = pytest.importorskip("nibabel")
    image = getattr(nibabel, kind)(array, np.eye(4) if affine is None else affine)
    if slope is not None:
        image.header.set_slope_inter(slope, intercept)
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(image, str(path))


def displayed(volume, z):
    """What an RAS+ volume's axial slice z must look like: anterior (high y) at the top, the patient's
    right (high x) on the left. Written with loops, independently of prepare.axial_slice."""
    X, Y = volume.shape[:2]
    return np.array([[volume[X - 1 - column, Y - 1 - row, z] for column in range(X)] for row in range(Y)])


def test_lits_slices_with_liver_window_and_patient_names(capsys, tmp_path):
    src, out = tmp_path / "LiTS", tmp_path / "out"
    hu = np.full((6, 4, 3), -1000, np.int16)  # x 6 (to the right), y 4 (to anterior), 3 slices; RAS+
    hu[1, 2, :] = 40   # the window's level: grey 128
    hu[5, 0, :] = 500  # above the window: white; the patient's rightmost, posterior voxel
    labels = np.zeros((6, 4, 3), np.uint8)
    labels[1:3, 1:3, 1] = 1
    labels[2, 2, 1] = 2  # tumour: still liver
    labels[0, 3, 2] = 1
    write_nifti(src / "Training Batch 1/volume-7.nii", (hu + 1024).astype(np.int16), slope=1.0, intercept=-1024.0)
    write_nifti(src / "Training Batch 1/segmentation-7.nii.gz", labels)
    write_nifti(src / "Training Batch 2/volume-8.nii", hu)  # no segmentation: left out, counted
    stdout = convert(capsys, "lits", src, out)
    assert "slices without liver" in stdout and "1 volumes without a segmentation" in stdout
    assert written(out) == ["lits007_z0001", "lits007_z0002"]  # slice 0 has no liver
    assert {data.patient_id(n) for n in written(out)} == {"lits007"}
    mask, image = read(out / "masks/lits007_z0001.png"), read(out / "images/lits007_z0001.png")
    assert mask.shape == (4, 6) and np.array_equal(mask, displayed(labels > 0, 1).astype(np.uint8))
    assert image[1, 4] == 128 and image[3, 0] == 255 and image[0, 0] == 0  # the right-posterior voxel: bottom left
    stdout = convert(capsys, "lits", src, tmp_path / "all", "--all-slices", "--window=-1000,1000")
    assert len(written(tmp_path / "all")) == 3 and read(tmp_path / "all/images/lits007_z0000.png")[0, 0] == 0
    # test volumes only: an unlabeled set of every slice
    write_nifti(tmp_path / "test/test-volume-3.nii", hu)
    stdout = convert(capsys, "lits", tmp_path / "test", tmp_path / "pool")
    assert written(tmp_path / "pool") == ["litstest003_z0000", "litstest003_z0001", "litstest003_z0002"]


@pytest.mark.parametrize("kind,suffix", [("Nifti1Image", ".nii.gz"), ("Nifti2Image", ".nii"), ("Nifti1Pair", ".hdr")])
def test_lits_faces_one_way_whatever_the_stored_orientation(capsys, tmp_path, kind, suffix):
    """The same anatomy stored canonically (RAS+, identity affine) and stored as many scanners do
    (LPS, y before x, feet and head swapped, 2 mm voxels, an offset) gives the same slices."""
    rng = np.random.default_rng(0)
    X, Y, Z = 6, 5, 4
    hu = rng.integers(-150, 230, (X, Y, Z)).astype(np.int16)
    liver = np.zeros((X, Y, Z), np.uint8)
    liver[0:3, 1:4, :] = 1  # on the patient's left
    stored_hu = np.ascontiguousarray(hu[::-1, ::-1, ::-1].transpose(1, 0, 2))
    stored_liver = np.ascontiguousarray(liver[::-1, ::-1, ::-1].transpose(1, 0, 2))
    # stored index (a, b, c) holds RAS voxel (X-1-b, Y-1-a, Z-1-c); world = 2 mm x voxel + offset
    affine = np.array([[0, -2, 0, 2 * (X - 1) + 10], [-2, 0, 0, 2 * (Y - 1) - 7],
                       [0, 0, -2, 2 * (Z - 1) + 3], [0, 0, 0, 1]], float)
    write_nifti(tmp_path / "canonical/volume-1.nii", hu, np.diag([2, 2, 2, 1.0]))
    write_nifti(tmp_path / "canonical/segmentation-1.nii", liver, np.diag([2, 2, 2, 1.0]))
    write_nifti(tmp_path / f"scanner/volume-1{suffix}", stored_hu, affine, kind=kind)
    write_nifti(tmp_path / f"scanner/segmentation-1{suffix}", stored_liver, affine, kind=kind)
    convert(capsys, "lits", tmp_path / "canonical", tmp_path / "a")
    convert(capsys, "lits", tmp_path / "scanner", tmp_path / "b")
    assert written(tmp_path / "a") == written(tmp_path / "b") == [f"lits001_z{z:04d}" for z in range(Z)]
    for z in range(Z):
        for folder in ("images", "masks"):
            assert np.array_equal(read(tmp_path / f"a/{folder}/lits001_z{z:04d}.png"),
                                  read(tmp_path / f"b/{folder}/lits001_z{z:04d}.png"))
        expected = prepare.window_to_8bit(displayed(hu.astype(np.float32), z), -160, 240)
        assert np.array_equal(read(tmp_path / f"a/images/lits001_z{z:04d}.png"), expected)
        mask = read(tmp_path / f"a/masks/lits001_z{z:04d}.png")
        assert mask[1:4, 3:].all() and mask.sum() == 9  # the patient's left is on the image's right


def test_lits_without_nibabel_says_what_to_install(capsys, tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/volume-1.nii").write_bytes(b"a volume")  # never read: the import fails first
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel now raises ImportError
    code, _, err = run_prepare(capsys, ["lits", tmp_path / "src", tmp_path / "out"])
    assert_one_error_line(code, err, "nibabel", "pip install nibabel")
    monkeypatch.undo()
    pytest.importorskip("nibabel")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/volume-2.nii").write_bytes(b"not a nifti")
    code, _, err = run_prepare(capsys, ["lits", tmp_path / "bad", tmp_path / "out2"])
    assert_one_error_line(code, err, "volume-2.nii", "nibabel cannot read it")


AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # rows run to the patient's left, columns to posterior (DICOM LPS)


def write_dicom(path, pixels, instance, position=None, orientation=AXIAL, syntax=None, photometric="MONOCHROME2",
                rescale=None):
    """A single-frame MR DICOM written by pydicom; `syntax` RLE Lossless compresses it."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.InstanceNumber = "MR", instance
    if orientation is not None:
        ds.ImageOrientationPatient = orientation
    if position is not None:
        ds.ImagePositionPatient = position
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    if syntax == "rle":
        ds.compress(RLELossless)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_slices_read_with_pydicom_rescaled_compressed_and_monochrome1(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    write_dicom(tmp_path / "a.dcm", pixels, 7, position=[0, 0, 5.0], rescale=(2, -5))
    read_pixels, orientation, position, instance = prepare.read_dicom_slice(pydicom, tmp_path / "a.dcm")
    assert instance == 7 and orientation == AXIAL and position == 5.0
    assert np.array_equal(read_pixels, pixels * 2.0 - 5.0)
    write_dicom(tmp_path / "rle.dcm", pixels, 1, syntax="rle")
    assert pydicom.dcmread(str(tmp_path / "rle.dcm")).file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(prepare.read_dicom_slice(pydicom, tmp_path / "rle.dcm")[0], pixels)
    write_dicom(tmp_path / "m1.dcm", pixels, 1, photometric="MONOCHROME1")
    assert np.array_equal(prepare.read_dicom_slice(pydicom, tmp_path / "m1.dcm")[0], 1100.0 - pixels)
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(data.DataError, match="bad.dcm: pydicom cannot read it"):
        prepare.read_dicom_slice(pydicom, tmp_path / "bad.dcm")


@pytest.mark.parametrize("orientation,flip", [([-1.0, 0, 0, 0, 1.0, 0], np.fliplr), ([1.0, 0, 0, 0, -1.0, 0], np.flipud),
                                              ([0, 1.0, 0, 1.0, 0, 0], np.transpose),
                                              ([0, -1.0, 0, -1.0, 0, 0], lambda a: np.rot90(a, 2).T)])
def test_dicom_to_display_undoes_the_stored_orientation(orientation, flip):
    """A slice stored with another orientation is the standard one flipped or transposed; undone."""
    standard = np.arange(12).reshape(3, 4)
    stored = flip(standard)
    assert np.array_equal(prepare.dicom_to_display(stored, orientation), standard)
    assert np.array_equal(prepare.dicom_to_display(standard, AXIAL), standard)
    coronal = [1.0, 0, 0, 0, 0, -1.0]  # DICOM's own coronal layout: rows run from head to feet, kept
    assert np.array_equal(prepare.dicom_to_display(standard, coronal), standard)
    assert np.array_equal(prepare.dicom_to_display(standard, [1.0, 0, 0, 0, 0, 1.0]), standard[::-1])


def test_chaos_pairs_in_acquisition_order_numbers_by_position_keeps_liver_only(capsys, tmp_path):
    src, out = tmp_path / "CHAOS_Train_Sets/Train_Sets", tmp_path / "out"
    t1 = src / "MR/3/T1DUAL"
    heights = [30.0, 10.0, 20.0]  # instance k+1 lies at heights[k] mm: anatomical order is 2, 3, 1
    for k in range(3):  # file names run against the instance numbers: the reader sorts by instance
        for phase, offset in (("InPhase", 0), ("OutPhase", 50)):
            slice_pixels = np.full((4, 5), 100 * (k + 1) + offset, np.uint16)
            write_dicom(t1 / f"DICOM_anon/{phase}/IMG-0004-{10 - k:05d}.dcm", slice_pixels, k + 1,
                        position=[-100.0, -80.0, heights[k]])
        ground = np.zeros((4, 5), np.uint8)
        if k != 1:
            ground[1:3, 1 + k:3 + k] = 63   # liver, moving right with the instance
            ground[0, 4] = 126              # right kidney: background here
        save(t1 / f"Ground/IMG-0002-{k + 1:05d}.png", ground)
    stdout = convert(capsys, "chaos", src.parent, out)
    assert "wrote 4 labeled pairs" in stdout and "2 slices without liver" in stdout
    # by position: z000 = instance 2 (no liver, left out), z001 = instance 3, z002 = instance 1
    assert written(out) == ["chaos3-in_z001", "chaos3-in_z002", "chaos3-out_z001", "chaos3-out_z002"]
    for name, k in (("chaos3-out_z001", 2), ("chaos3-in_z002", 0)):
        expected = np.zeros((4, 5), np.uint8)
        expected[1:3, 1 + k:3 + k] = 1
        assert np.array_equal(read(out / f"masks/{name}.png"), expected)
    # instance 3 is the brightest slice of its phase, instance 1 the darkest
    assert read(out / "images/chaos3-in_z001.png")[0, 0] > read(out / "images/chaos3-in_z002.png")[0, 0]
    assert data.patient_id("chaos3-in_z001") == "chaos3-in"
    convert(capsys, "chaos", src.parent, tmp_path / "in", "--phase", "in")
    assert written(tmp_path / "in") == ["chaos3-in_z001", "chaos3-in_z002"]
    # a patient stored mirrored (rows running to the patient's right), its ground truth too: same output
    mirrored = src / "MR/4/T1DUAL"
    for k in range(3):
        for phase, offset in (("InPhase", 0), ("OutPhase", 50)):
            write_dicom(mirrored / f"DICOM_anon/{phase}/IMG-0004-{10 - k:05d}.dcm",
                        np.full((4, 5), 100 * (k + 1) + offset, np.uint16), k + 1,
                        position=[100.0, -80.0, heights[k]], orientation=[-1.0, 0, 0, 0, 1.0, 0])
        save(mirrored / f"Ground/IMG-0002-{k + 1:05d}.png", np.fliplr(read(t1 / f"Ground/IMG-0002-{k + 1:05d}.png")))
    convert(capsys, "chaos", src.parent, tmp_path / "both")
    for name in written(out):
        for folder in ("images", "masks"):
            assert np.array_equal(read(tmp_path / f"both/{folder}/{name}.png"),
                                  read(tmp_path / f"both/{folder}/{name.replace('chaos3', 'chaos4')}.png"))
    (t1 / "Ground/IMG-0002-00003.png").unlink()
    code, _, err = run_prepare(capsys, ["chaos", src.parent, tmp_path / "bad"])
    assert_one_error_line(code, err, "Ground", "2 ground-truth PNGs for 3 InPhase slices")


def test_chaos_without_positions_keeps_acquisition_order(capsys, tmp_path):
    t1 = tmp_path / "src/MR/1/T1DUAL"
    for k in range(3):
        write_dicom(t1 / f"DICOM_anon/InPhase/IMG-{9 - k}.dcm", np.full((2, 3), 10 * k, np.uint16), k + 1,
                    orientation=None)
    stdout = convert(capsys, "chaos", tmp_path / "src", tmp_path / "out", "--phase", "in")
    assert "unlabeled" in stdout
    values = [read(tmp_path / f"out/images/chaos1-in_z{k:03d}.png")[0, 0] for k in range(3)]
    assert values[0] < values[1] < values[2]


def test_chaos_without_pydicom_says_what_to_install(capsys, tmp_path, monkeypatch):
    (tmp_path / "src/MR/1/T1DUAL/DICOM_anon/InPhase").mkdir(parents=True)
    (tmp_path / "src/MR/1/T1DUAL/DICOM_anon/InPhase/a.dcm").write_bytes(b"a slice")  # never read
    monkeypatch.setitem(sys.modules, "pydicom", None)
    code, _, err = run_prepare(capsys, ["chaos", tmp_path / "src", tmp_path / "out"])
    assert_one_error_line(code, err, "pydicom", "pip install 'pydicom>=3'")


# ----------------------------------------------------------------------------------------------------
# prepare's own errors


def test_prepare_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_prepare(capsys, ["jsrt", tmp_path / "nowhere", tmp_path / "out"])
    assert_one_error_line(code, err, "nowhere", "no such folder")
    (tmp_path / "empty").mkdir()
    code, _, err = run_prepare(capsys, ["isic2018", tmp_path / "empty", tmp_path / "out"])
    assert_one_error_line(code, err, "empty", "no isic2018 images found", "ISIC_NNNNNNN_segmentation.png")
    code, _, err = run_prepare(capsys, ["lits", tmp_path / "empty", tmp_path / "out"])
    assert_one_error_line(code, err, "no LiTS volumes")
    save(tmp_path / "bad/CXR_png/a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad/masks").mkdir()
    (tmp_path / "bad/masks/a_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    code, _, err = run_prepare(capsys, ["shenzhen", tmp_path / "bad", tmp_path / "out"])
    assert_one_error_line(code, err, "a_mask.png", "not a readable image")


def md5s(folder):
    """{relative path: md5} of every file under `folder`: any file written, replaced or added shows."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def nih_release(src):
    save(src / "images/00000001_000.png", np.full((6, 6), 50, np.uint8))
    save(src / "masks/00000001_000.png", blob_mask((6, 6), 2, 2, 2, 2))
    return src


def test_prepare_never_writes_into_its_source(capsys, tmp_path):
    src = nih_release(tmp_path / "NIH")
    (tmp_path / "link").symlink_to(src)
    before = md5s(src)
    for out in (src, src / "converted", tmp_path / "link", tmp_path / "link/converted"):
        code, _, err = run_prepare(capsys, ["nih", src, out, "--size", 4])
        assert_one_error_line(code, err, str(out), "OUT is SRC", "pass an OUT outside SRC")
        assert md5s(src) == before
    inner = nih_release(tmp_path / "out/images/NIH")
    before = md5s(tmp_path / "out")
    code, _, err = run_prepare(capsys, ["nih", inner, tmp_path / "out", "--size", 4])
    assert_one_error_line(code, err, "SRC lies in", "where the converter writes")
    assert md5s(tmp_path / "out") == before


def test_prepare_refuses_an_out_that_holds_a_data_set(capsys, tmp_path):
    src, out = nih_release(tmp_path / "NIH"), tmp_path / "out"
    (out / "images").mkdir(parents=True)  # an empty folder is fine
    convert(capsys, "nih", src, out)
    before = md5s(out)
    code, _, err = run_prepare(capsys, ["nih", src, out, "--size", 4])
    assert_one_error_line(code, err, "OUT already holds a data set (1 files in", "pass a new or empty folder")
    assert md5s(out) == before
    save(tmp_path / "theirs/masks/a.png", np.zeros((4, 4), np.uint8))
    code, _, err = run_prepare(capsys, ["nih", src, tmp_path / "theirs"])
    assert_one_error_line(code, err, "theirs", "OUT already holds a data set (1 files in", "masks")
