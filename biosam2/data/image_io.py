"""Reading and writing images, volumes and label maps, keeping their geometry.

Array conventions, used everywhere in biosam2:

- 2-D images: ``(H, W)`` grey or ``(H, W, C)`` colour; spacing ``(1, 1)`` (pixels) unless a format
  says otherwise. Formats: PNG, JPEG, BMP, TIFF (8/16-bit, float), grey or RGB.
- 3-D volumes: nibabel's ``(X, Y, Z)`` order, sliced along the last axis; ``affine`` is the 4x4
  voxel-to-world matrix, ``spacing`` the voxel size in mm. Formats: NIfTI through nibabel; NRRD and
  MetaImage through SimpleITK (transposed to the same order); a multi-page grey TIFF (z-stack) is a
  volume ``(H, W, Z)`` with a unit affine, its slices the pages.

Every failure is a :class:`DataError` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from biosam2.atomic_io import atomic_output, atomic_output_with_data_files
from biosam2.errors import DataError

IMAGE_2D_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_ENDINGS = (".nii.gz", ".nii")
SITK_ENDINGS = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_ENDINGS = NIFTI_ENDINGS + SITK_ENDINGS
TIFF_ENDINGS = (".tif", ".tiff")
# The NIfTI description (80 bytes at most) of volumes written with a stand-in 1 mm spacing.
UNKNOWN_SPACING = "biosam2: voxel spacing unknown, written as 1 mm (distances in voxels)"
TIFF_STACK = "tiff-stack"  # LoadedImage.reference of a multi-page TIFF read as a volume


def file_ending(path: str | Path) -> str:
    name = Path(path).name.lower()
    for ending in (*NIFTI_ENDINGS, *SITK_ENDINGS, *IMAGE_2D_ENDINGS):
        if name.endswith(ending):
            return ending
    return Path(path).suffix.lower()


def is_volume_path(path: str | Path) -> bool:
    return file_ending(path) in VOLUME_ENDINGS


@dataclass
class LoadedImage:
    """Pixels/voxels plus what is needed to write a result with exactly the same geometry."""

    array: np.ndarray
    path: Path
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None  # 3-D only
    reference: Any = field(default=None, repr=False)  # nibabel header or SimpleITK image, for writing
    spacing_known: bool = True  # False: a NIfTI written with a 1 mm stand-in (see UNKNOWN_SPACING)

    @property
    def is_volume(self) -> bool:
        return self.affine is not None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[:3] if self.is_volume else self.array.shape[:2])


def read_image(path: str | Path, *, palette_indices: bool = False) -> LoadedImage:
    """Read any supported 2-D image or 3-D volume; dtype is kept as stored.

    ``palette_indices``: a palette ("P") PNG gives its indices (label maps), not its colours (images).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an image file")
    ending = file_ending(path)
    try:
        if ending in NIFTI_ENDINGS:
            loaded = _read_nifti(path)
        elif ending in SITK_ENDINGS:
            loaded = _read_sitk(path)
        elif ending in (".tif", ".tiff"):
            loaded = _read_tiff(path)
        elif ending in IMAGE_2D_ENDINGS:
            loaded = _read_pil(path, palette_indices)
        else:
            raise DataError(
                f"{path}: unsupported file type {ending!r}; use one of "
                f"{', '.join(IMAGE_2D_ENDINGS + VOLUME_ENDINGS)}"
            )
    except DataError:
        raise
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable (chmod +r)") from None
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, RuntimeError, SyntaxError) as error:
        raise DataError(f"{path}: cannot be read as {ending} ({type(error).__name__}: {error}); is it truncated or not an image?") from None
    _check_contents(loaded)
    return loaded


def _check_contents(loaded: LoadedImage) -> None:
    array = loaded.array
    if array.size == 0 or 0 in loaded.spatial_shape:
        raise DataError(f"{loaded.path}: empty image (shape {array.shape})")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{loaded.path}: unsupported pixel type {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        count = int((~np.isfinite(array)).sum())
        raise DataError(f"{loaded.path}: {count} NaN or infinite value(s); fix or mask them before use")


def _read_pil(path: Path, palette_indices: bool = False) -> LoadedImage:
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        opened.load()  # decode now, so a truncated file fails here, with its name
        # Pixels as every viewer shows them (EXIF orientation applied), for images and masks alike:
        # a phone photo stored sideways must pair with its mask and get its labels the right way up.
        image = ImageOps.exif_transpose(opened)
        mode = image.mode
        if mode == "P" and palette_indices:
            pass  # a label map stored with a palette: the indices are the class ids
        elif mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif mode in ("LA", "PA"):
            image = image.convert("L")
        elif mode == "CMYK":
            image = image.convert("RGB")
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 4:  # RGBA: alpha carries no intensity
        array = array[..., :3]
    return LoadedImage(np.ascontiguousarray(array), path, (1.0, 1.0))


# TIFF/EXIF orientation (tag 274) -> the pixels as shown, on axes (0, 1): what PIL's exif_transpose does.
_ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _read_tiff(path: Path) -> LoadedImage:
    """A TIFF's pages and samples told apart by tifffile's own axes ('YX', 'YXS', 'SYX', 'QYX', ...),
    never guessed from the array's shape: a 3- or 4-page grey z-stack is not an RGB(A) image.

    One grey or colour image -> a 2-D image; a grey stack of pages (Z, Y, X) -> a volume (Y, X, Z)
    with a unit affine, sliced along its pages (each slice in the orientation of the 2-D image).
    """
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        array, axes = series.asarray(), series.axes
        # Pages written as separate one-page series (tifffile's contiguous=False, some scanners)
        # are one stack too; reading only the first would drop the others.
        same = [other for other in tiff.series[1:] if other.shape == series.shape and other.dtype == series.dtype]
        if same:
            array, axes = np.stack([array, *(other.asarray() for other in same)]), "I" + axes
        imagej_channels = int((tiff.imagej_metadata or {}).get("channels", 1) or 1)
        orientation_tag = tiff.pages[0].tags.get(274)
        orientation = int(orientation_tag.value) if orientation_tag is not None else 1
        orientation = orientation if orientation in _ORIENTED else 1  # as viewers do with invalid values
    # ImageJ's C axis is channels only when ImageJ says so; otherwise its pages are a stack.
    axes = axes.replace("C", "S") if imagej_channels > 1 else axes
    single = tuple(i for i, axis in enumerate(axes) if array.shape[i] == 1 and axis not in "YX")
    array, axes = np.squeeze(array, axis=single), "".join(a for i, a in enumerate(axes) if i not in single)
    if "S" in axes and axes != "YXS":
        array, axes = np.moveaxis(array, axes.index("S"), -1), axes.replace("S", "") + "S"
    if axes == "YXS" and array.shape[2] in (2, 4):  # grey + alpha, RGBA: alpha carries no intensity
        array = array[..., 0] if array.shape[2] == 2 else array[..., :3]
        axes = "YX" if array.ndim == 2 else axes
    if axes == "YX" or (axes == "YXS" and array.shape[2] == 3):
        return LoadedImage(np.ascontiguousarray(_ORIENTED[orientation](array)), path, (1.0, 1.0))
    if len(axes) == 3 and axes.endswith("YX"):  # pages of one grey image each: a z-stack
        volume = np.ascontiguousarray(_ORIENTED[orientation](np.moveaxis(array, 0, -1)))
        return LoadedImage(volume, path, (1.0, 1.0, 1.0), np.eye(4), TIFF_STACK)
    raise DataError(
        f"{path}: TIFF with axes {axes} (shape {array.shape}) is neither one grey or RGB image nor a "
        "stack of grey pages; save it as one of these (or as NIfTI)"
    )


def _read_nifti(path: Path) -> LoadedImage:
    import nibabel as nib

    image = nib.load(str(path))
    array = np.asanyarray(image.dataobj)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, found shape {array.shape}")
    # A 2-D NIfTI (X, Y) is a volume of one slice; its header has two zooms, the slice axis gets 1 mm.
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    spacing = tuple(zooms + [1.0] * (3 - len(zooms)))
    header = image.header
    spacing_known = bytes(header["descrip"]).rstrip(b"\0").decode("latin-1") != UNKNOWN_SPACING
    return LoadedImage(np.ascontiguousarray(array), path, spacing, np.asarray(image.affine, dtype=np.float64), header, spacing_known)


def _read_sitk(path: Path) -> LoadedImage:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected a single-channel 3-D volume, found {image.GetDimension()}-D")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))  # (Z,Y,X) -> (X,Y,Z)
    spacing = tuple(float(s) for s in image.GetSpacing())
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing)
    affine[:3, 3] = image.GetOrigin()
    # ITK's world coordinates are LPS, nibabel's RAS: express every affine in RAS so that volumes
    # read through either library compare equal.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return LoadedImage(array, path, spacing, affine, image)


def read_label(path: str | Path) -> LoadedImage:
    """A label map: integer class ids (floats with integer values are accepted and converted).

    Palette PNGs give their indices. JPEG is refused: its compression invents values that are no class.
    """
    if file_ending(path) in (".jpg", ".jpeg"):
        raise DataError(
            f"{path}: JPEG label maps are not supported (lossy compression changes class ids at every edge); "
            "save label maps losslessly, e.g. as PNG"
        )
    loaded = read_image(path, palette_indices=True)
    array = loaded.array
    if array.ndim == (4 if loaded.is_volume else 3):
        raise DataError(f"{loaded.path}: a label map must have one channel, found shape {array.shape}")
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise DataError(f"{loaded.path}: label map has non-integer values; labels must be class ids")
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    if array.min() < 0:
        raise DataError(f"{loaded.path}: label map has negative values ({int(array.min())})")
    loaded.array = array.astype(np.int64 if array.max() > 65535 else np.uint16 if array.max() > 255 else np.uint8)
    return loaded


def same_geometry(a: LoadedImage, b: LoadedImage, tolerance: float = 1e-3) -> str | None:
    """None if ``a`` and ``b`` cover the same grid, else a sentence saying how they differ."""
    if a.spatial_shape != b.spatial_shape:
        return f"size {a.spatial_shape} vs {b.spatial_shape}"
    if a.is_volume != b.is_volume:
        return "one is a 3-D volume, the other a 2-D image"
    if a.is_volume:
        if not np.allclose(a.spacing, b.spacing, atol=tolerance, rtol=tolerance):
            return f"spacing {tuple(round(s, 4) for s in a.spacing)} vs {tuple(round(s, 4) for s in b.spacing)}"
        if not np.allclose(a.affine, b.affine, atol=tolerance * 10, rtol=tolerance):
            return "orientation or origin (affine) differ"
    return None


# ---- writing ----------------------------------------------------------------------------------
def write_label_png(path: str | Path, label: np.ndarray) -> None:
    """A 2-D label map as a lossless PNG (8-bit, or 16-bit for more than 256 classes)."""
    from PIL import Image

    label = np.asarray(label)
    dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
    with atomic_output(path, suffix=".png") as temporary:
        Image.fromarray(label.astype(dtype)).save(temporary, format="PNG")


def write_image_png(path: str | Path, image: np.ndarray) -> None:
    """An 8-bit grey or RGB image as PNG."""
    from PIL import Image

    with atomic_output(path, suffix=".png") as temporary:
        # Fast compression: converting 1000 Kvasir images spends most of its time in PNG encoding.
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(temporary, format="PNG", compress_level=1)


def write_like(path: str | Path, array: np.ndarray, reference: LoadedImage) -> None:
    """Write ``array`` with exactly the geometry of ``reference`` (same affine, spacing, header)."""
    path = Path(path)
    ending = file_ending(path)
    array = np.asarray(array)
    if array.shape[: len(reference.spatial_shape)] != reference.spatial_shape:
        raise DataError(f"{path}: result of shape {array.shape} does not match {reference.path} {reference.spatial_shape}")
    if not reference.is_volume:
        if ending != ".png":
            raise DataError(f"{path}: 2-D results are written as .png")
        write_label_png(path, array)
        return
    if ending in NIFTI_ENDINGS:
        import nibabel as nib

        if reference.reference is not None and hasattr(reference.reference, "copy"):
            header = reference.reference.copy()
        else:
            header = nib.Nifti1Header()
        header.set_data_dtype(array.dtype)
        if header["dim"][0] == 2 and array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]  # a 2-D NIfTI input gets a 2-D NIfTI result
        image = nib.Nifti1Image(array, reference.affine, header)
        image.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
        image.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
        with atomic_output(path, suffix=ending) as temporary:
            nib.save(image, str(temporary))
    elif ending in SITK_ENDINGS:
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        if reference.reference is not None:
            image.CopyInformation(reference.reference)
        else:
            image.SetSpacing(reference.spacing)
        # .mhd/.nhdr headers name their data file: write the pair under the final names.
        detached = ending in (".mhd", ".nhdr")
        with (atomic_output_with_data_files(path) if detached else atomic_output(path, suffix=ending)) as temporary:
            sitk.WriteImage(image, str(temporary), useCompression=True)
    elif ending in TIFF_ENDINGS:  # a z-stack's result: one page per slice, as the input
        import tifffile

        with atomic_output(path, suffix=ending) as temporary:
            tifffile.imwrite(temporary, np.ascontiguousarray(np.moveaxis(array, -1, 0)), photometric="minisblack")
    else:
        raise DataError(f"{path}: volumes are written as {', '.join(VOLUME_ENDINGS + TIFF_ENDINGS)}")


def write_volume(path: str | Path, array: np.ndarray, affine: np.ndarray, *, spacing_known: bool = True) -> None:
    """A new NIfTI volume (converters use this; results use :func:`write_like`). With ``spacing_known``
    False (a source that stores no spacing, written with a 1 mm stand-in) the file says so itself:
    spatial unit "unknown" and :data:`UNKNOWN_SPACING` as its description, which predictions copy, so
    that `evaluate` reports HD95 in voxels even for files copied away from their dataset.json."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    if spacing_known:
        image.header.set_xyzt_units(xyz="mm")
    else:
        image.header.set_xyzt_units(xyz="unknown")
        image.header["descrip"] = UNKNOWN_SPACING.encode("latin-1")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_output(path, suffix=".nii.gz") as temporary:
        nib.save(image, str(temporary))
