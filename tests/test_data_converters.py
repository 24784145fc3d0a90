"""`python data.py prepare NAME SRC OUT`: each converter on a tiny replica of its release's layout, written
here, with the outputs checked against what the test knows: names, counts, class ids, pixel values.
Also the raw-format readers (JSRT .IMG, NIfTI, DICOM) on files this test writes byte by byte."""
import gzip
import struct

import numpy as np
import pytest
from PIL import Image

import data
from test_data import assert_one_error_line, run_main, save

# ----------------------------------------------------------------------------------------------------
# Helpers


def prepare(capsys, name, src, out, *extra):
    code, stdout, stderr = run_main(capsys, ["prepare", name, src, out, *extra])
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
    stdout = prepare(capsys, "celebamask", src, out)
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
    prepare(capsys, "celebamask19", src, out)
    assert read(out / "masks/7.png")[0].tolist() == [data.CELEBAMASK19_TO_8[v] for v in range(19)]
    save(src / "CelebAMask-HQ-mask/7.png", np.full((3, 19), 19, np.uint8))
    code, _, err = run_main(capsys, ["prepare", "celebamask19", src, tmp_path / "out2"])
    assert_one_error_line(code, err, "7.png", "not one of the 19")


def test_metfaces40_reads_index_and_colour_labels(capsys, tmp_path):
    src, out = tmp_path / "metfaces40", tmp_path / "out"
    index = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.uint8)
    save(src / "image/a.png", rgb_noise(4, 1)[:2])
    save(src / "label/a.png", index)
    save(src / "image/b.png", rgb_noise(4, 2)[:2])
    save(src / "label/b.png", np.array(data.FACE8_COLOURS, np.uint8)[index])
    prepare(capsys, "metfaces40", src, out)
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
    stdout = prepare(capsys, "jsrt", src, out)
    assert "wrote 1 labeled pairs" in stdout and "left out 1 images without a mask" in stdout
    image, mask = read(out / "images/JPCLN001.png"), read(out / "masks/JPCLN001.png")
    assert image.shape == mask.shape == (8, 8)
    assert np.array_equal(mask, ((left > 0) | (right > 0)).astype(np.uint8))
    assert image[1, 0] == 0 and image[0, 7] == round((4095 - 1000) * 255 / 4095)
    assert image[0, 0] == round((4095 - 3071.25) * 255 / 4095)
    # without any SCR mask the images are an unlabeled set
    stdout = prepare(capsys, "jsrt", src / "images", tmp_path / "unlabeled")
    assert "2 unlabeled images" in stdout and written(tmp_path / "unlabeled") == ["JPCLN001", "JPCNN010"]
    assert read(tmp_path / "unlabeled/images/JPCLN001.png").shape == (16, 16)


def test_jsrt_reader_rejects_a_file_of_the_wrong_length(tmp_path):
    (tmp_path / "x.IMG").write_bytes(b"\0" * 1000)
    with pytest.raises(data.DataError, match="not a square of 16-bit pixels"):
        data.read_jsrt(tmp_path / "x.IMG")


def test_montgomery_merges_left_and_right_masks(capsys, tmp_path):
    src, out = tmp_path / "MontgomerySet", tmp_path / "out"
    save(src / "CXR_png/MCUCXR_0001_0.png", np.full((10, 8), 100, np.uint8))
    left, right = blob_mask((10, 8), 1, 1, 6, 2), blob_mask((10, 8), 2, 5, 6, 2)
    save(src / "ManualMask/leftMask/MCUCXR_0001_0.png", left)
    save(src / "ManualMask/rightMask/MCUCXR_0001_0.png", right)
    prepare(capsys, "nlm", src, out)
    assert np.array_equal(read(out / "masks/MCUCXR_0001_0.png"), ((left | right) > 0).astype(np.uint8))
    assert read(out / "images/MCUCXR_0001_0.png").shape == (10, 8)  # not squared unless --size
    prepare(capsys, "montgomery", src, tmp_path / "sq", "--size", 5)
    assert read(tmp_path / "sq/masks/MCUCXR_0001_0.png").shape == (5, 5)


def test_shenzhen_matches_name_mask_files_and_counts_the_rest(capsys, tmp_path):
    src, out = tmp_path / "data/masks_everywhere/shenzhen", tmp_path / "out"  # folder names above SRC never count
    for i in range(3):
        save(src / f"ChinaSet_AllFiles/CXR_png/CHNCXR_000{i}_0.png", np.full((6, 6), 10 * i, np.uint8))
    save(src / "mask/CHNCXR_0000_0_mask.png", blob_mask((6, 6), 1, 1, 3, 3))
    save(src / "mask/CHNCXR_0002_0_mask.png", blob_mask((6, 6), 0, 0, 2, 2))
    stdout = prepare(capsys, "sz", src, out)
    assert "wrote 2 labeled pairs" in stdout and "left out 1 images without a mask" in stdout
    assert written(out) == ["CHNCXR_0000_0", "CHNCXR_0002_0"]
    assert read(out / "masks/CHNCXR_0002_0.png").sum() == 4
    assert (read(out / "images/CHNCXR_0002_0.png") == 20).all()


def test_nih_images_and_masks_folders(capsys, tmp_path):
    src, out = tmp_path / "NIH", tmp_path / "out"
    save(src / "images/00000001_000.png", np.full((6, 6), 50, np.uint8))
    save(src / "masks/00000001_000.png", blob_mask((6, 6), 2, 2, 2, 2) // 255)  # 0 / 1 masks work too
    prepare(capsys, "nih", src, out)
    assert read(out / "masks/00000001_000.png").sum() == 4


def test_chestxray14_writes_grey_images_from_nested_folders(capsys, tmp_path):
    src, out = tmp_path / "cxr14", tmp_path / "out"
    save(src / "images_001/images/00000001_000.png", np.full((8, 8), 77, np.uint8))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 120, 255
    save(src / "images_002/images/00000002_001.png", rgba)  # some ChestX-ray14 images are RGBA
    stdout = prepare(capsys, "chestxray14", src, out)
    assert "2 unlabeled images" in stdout and not (out / "masks").exists()
    assert (read(out / "images/00000002_001.png") == 120).all()
    assert Image.open(out / "images/00000002_001.png").mode == "L"
    labeled, unlabeled, info = data.build_datasets(_args(out))
    assert labeled is None and len(unlabeled) == 2 and info["channels"] == 1


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
    stdout = prepare(capsys, "isic2018", src, out)
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
    prepare(capsys, "ph2", src.parent, out)
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
    stdout = prepare(capsys, name, src, out)
    assert "wrote 2 labeled pairs" in stdout and "left out 1 images without a mask" in stdout
    assert written(out) == ["melanoma_1", "notmelanoma_1"] and read(out / "masks/melanoma_1.png").sum() == 9


# ----------------------------------------------------------------------------------------------------
# Liver: NIfTI (LiTS) and DICOM (CHAOS)


def write_nifti(path, array, slope=1.0, intercept=0.0, magic=b"n+1\0"):
    """A NIfTI-1 single file: 348-byte header, 4 bytes of extension flags, voxels x fastest."""
    codes = {np.dtype("int16"): 4, np.dtype("uint8"): 2, np.dtype("float32"): 16}
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, array.ndim, *array.shape, *[1] * (7 - array.ndim))
    struct.pack_into("<hh", header, 70, codes[array.dtype], array.dtype.itemsize * 8)
    struct.pack_into("<fff", header, 108, 352.0, slope, intercept)
    header[344:348] = magic
    payload = bytes(header) + b"\0" * 4 + array.tobytes(order="F")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)


def test_nifti_reader_plain_and_gzip_with_scaling(tmp_path):
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    write_nifti(tmp_path / "a.nii", volume, slope=2.0, intercept=-5.0)
    write_nifti(tmp_path / "a.nii.gz", volume)
    voxels, slope, intercept = data.read_nifti(tmp_path / "a.nii")
    assert voxels.shape == (2, 3, 4) and np.array_equal(np.asarray(voxels), volume)
    assert (slope, intercept) == (2.0, -5.0)
    assert np.array_equal(data.nifti_slice(voxels, slope, intercept, 1), volume[:, :, 1].T * 2.0 - 5.0)
    assert np.array_equal(np.asarray(data.read_nifti(tmp_path / "a.nii.gz")[0]), volume)
    write_nifti(tmp_path / "pair.nii", volume, magic=b"ni1\0")
    with pytest.raises(data.DataError, match="hdr/.img pair"):
        data.read_nifti(tmp_path / "pair.nii")
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress((tmp_path / "a.nii").read_bytes()[:360]))
    with pytest.raises(data.DataError, match="truncated"):
        data.read_nifti(tmp_path / "cut.nii.gz")


def test_lits_slices_with_liver_window_and_patient_names(capsys, tmp_path):
    src, out = tmp_path / "LiTS", tmp_path / "out"
    hu = np.full((6, 4, 3), -1000, np.int16)  # x 6, y 4, 3 slices
    hu[1, 2, :] = 40   # the window's level: grey 128
    hu[5, 0, :] = 500  # above the window: white
    labels = np.zeros((6, 4, 3), np.uint8)
    labels[1:3, 1:3, 1] = 1
    labels[2, 2, 1] = 2  # tumour: still liver
    labels[0, 3, 2] = 1
    write_nifti(src / "Training Batch 1/volume-7.nii", (hu + 1024).astype(np.int16), intercept=-1024.0)
    write_nifti(src / "Training Batch 1/segmentation-7.nii.gz", labels)
    write_nifti(src / "Training Batch 2/volume-8.nii", hu)  # no segmentation: left out, counted
    stdout = prepare(capsys, "lits", src, out)
    assert "slices without liver" in stdout and "1 volumes without a segmentation" in stdout
    assert written(out) == ["lits007_z0001", "lits007_z0002"]  # slice 0 has no liver
    assert {data.patient_id(n) for n in written(out)} == {"lits007"}
    mask, image = read(out / "masks/lits007_z0001.png"), read(out / "images/lits007_z0001.png")
    assert mask.shape == (4, 6) and np.array_equal(mask, (labels[:, :, 1] > 0).T.astype(np.uint8))  # rows = y
    assert image[2, 1] == 128 and image[0, 5] == 255 and image[0, 0] == 0
    stdout = prepare(capsys, "lits", src, tmp_path / "all", "--all-slices", "--window=-1000,1000")
    assert len(written(tmp_path / "all")) == 3 and read(tmp_path / "all/images/lits007_z0000.png")[0, 0] == 0
    # test volumes only: an unlabeled set of every slice
    write_nifti(tmp_path / "test/test-volume-3.nii", hu)
    stdout = prepare(capsys, "lits", tmp_path / "test", tmp_path / "pool")
    assert written(tmp_path / "pool") == ["litstest003_z0000", "litstest003_z0001", "litstest003_z0002"]


LONG_VRS = {b"OB", b"OW", b"SQ", b"UN", b"UT"}


def dicom_element(group, element, vr, value, explicit):
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if not explicit:
        return struct.pack("<HHI", group, element, len(value)) + value
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def write_dicom(path, pixels, instance, explicit=True, part10=True, syntax=None):
    """A DICOM file with an undefined-length sequence before the pixels (the reader must skip it)."""
    syntax = syntax or ("1.2.840.10008.1.2.1" if explicit else "1.2.840.10008.1.2")
    rows, columns = pixels.shape
    undefined = 0xFFFFFFFF
    item = dicom_element(0x0008, 0x1150, b"UI", b"1.2.3.4", explicit)
    if explicit:
        sequence = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, undefined)
    else:
        sequence = struct.pack("<HHI", 0x0008, 0x1140, undefined)
    sequence += struct.pack("<HHI", 0xFFFE, 0xE000, undefined) + item + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sequence += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    body = (dicom_element(0x0008, 0x0060, b"CS", b"MR", explicit) + sequence
            + dicom_element(0x0020, 0x0013, b"IS", str(instance).encode(), explicit)
            + dicom_element(0x0028, 0x0002, b"US", struct.pack("<H", 1), explicit)
            + dicom_element(0x0028, 0x0004, b"CS", b"MONOCHROME2", explicit)
            + dicom_element(0x0028, 0x0010, b"US", struct.pack("<H", rows), explicit)
            + dicom_element(0x0028, 0x0011, b"US", struct.pack("<H", columns), explicit)
            + dicom_element(0x0028, 0x0100, b"US", struct.pack("<H", 16), explicit)
            + dicom_element(0x0028, 0x0103, b"US", struct.pack("<H", 0), explicit)
            + dicom_element(0x7FE0, 0x0010, b"OW", pixels.astype("<u2").tobytes(), explicit))
    meta = dicom_element(0x0002, 0x0010, b"UI", syntax.encode(), True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\0" * 128 + b"DICM" + meta if part10 else b"") + body)


@pytest.mark.parametrize("explicit,part10", [(True, True), (False, True), (False, False)])
def test_dicom_reader(tmp_path, explicit, part10):
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    write_dicom(tmp_path / "a.dcm", pixels, 7, explicit, part10)
    read_pixels, instance = data.read_dicom(tmp_path / "a.dcm")
    assert instance == 7 and np.array_equal(read_pixels, pixels.astype(np.float32))


def test_dicom_reader_sends_compressed_files_to_pydicom(tmp_path):
    write_dicom(tmp_path / "j.dcm", np.zeros((2, 2), np.uint16), 1, syntax="1.2.840.10008.1.2.4.50")
    try:
        import pydicom  # noqa: F401
        pytest.skip("pydicom is installed: it reads compressed files itself")
    except ImportError:
        pass
    with pytest.raises(data.DataError, match="pip install pydicom"):
        data.read_dicom(tmp_path / "j.dcm")


def test_chaos_pairs_slices_in_order_and_keeps_liver_only(capsys, tmp_path):
    src, out = tmp_path / "CHAOS_Train_Sets/Train_Sets", tmp_path / "out"
    t1 = src / "MR/3/T1DUAL"
    for k in range(3):  # file names run against the instance numbers: the reader sorts by instance
        for phase, offset in (("InPhase", 0), ("OutPhase", 50)):
            slice_pixels = np.full((4, 5), 100 * (k + 1) + offset, np.uint16)
            write_dicom(t1 / f"DICOM_anon/{phase}/IMG-0004-{10 - k:05d}.dcm", slice_pixels, k + 1,
                        explicit=(phase == "InPhase"))
        ground = np.zeros((4, 5), np.uint8)
        if k >= 1:
            ground[1:3, 1:3] = 63       # liver
            ground[0, 4] = 126          # right kidney: background here
        save(t1 / f"Ground/IMG-0002-{k + 1:05d}.png", ground)
    stdout = prepare(capsys, "chaos", src.parent, out)
    assert "wrote 4 labeled pairs" in stdout and "2 slices without liver" in stdout
    assert written(out) == ["chaos3-in_z001", "chaos3-in_z002", "chaos3-out_z001", "chaos3-out_z002"]
    expected = np.zeros((4, 5), np.uint8)
    expected[1:3, 1:3] = 1
    assert np.array_equal(read(out / "masks/chaos3-out_z002.png"), expected)
    # slice order by instance: brightness grows with k, in each phase mapped over its own range
    assert read(out / "images/chaos3-in_z001.png")[0, 0] < read(out / "images/chaos3-in_z002.png")[0, 0]
    assert data.patient_id("chaos3-in_z001") == "chaos3-in"
    prepare(capsys, "chaos", src.parent, tmp_path / "in", "--phase", "in")
    assert written(tmp_path / "in") == ["chaos3-in_z001", "chaos3-in_z002"]
    (t1 / "Ground/IMG-0002-00003.png").unlink()
    code, _, err = run_main(capsys, ["prepare", "chaos", src.parent, tmp_path / "bad"])
    assert_one_error_line(code, err, "Ground", "2 ground-truth PNGs for 3 InPhase slices")


# ----------------------------------------------------------------------------------------------------
# prepare's own errors


def test_prepare_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_main(capsys, ["prepare", "jsrt", tmp_path / "nowhere", tmp_path / "out"])
    assert_one_error_line(code, err, "nowhere", "no such folder")
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, ["prepare", "isic2018", tmp_path / "empty", tmp_path / "out"])
    assert_one_error_line(code, err, "empty", "no isic2018 images found", "ISIC_NNNNNNN_segmentation.png")
    code, _, err = run_main(capsys, ["prepare", "lits", tmp_path / "empty", tmp_path / "out"])
    assert_one_error_line(code, err, "no LiTS volumes")
    save(tmp_path / "bad/CXR_png/a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad/masks").mkdir()
    (tmp_path / "bad/masks/a_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    code, _, err = run_main(capsys, ["prepare", "shenzhen", tmp_path / "bad", tmp_path / "out"])
    assert_one_error_line(code, err, "a_mask.png", "not a readable image")
