/* Region-of-interest JPEG decoding for the training loader (albef.data.transforms).
 *
 * RandomResizedCrop keeps 20-100% of an image's area, yet a plain decoder (Pillow, OpenCV) runs the inverse DCT,
 * upsampling and colour conversion on every pixel. libjpeg-turbo's libjpeg API (>= 1.5) can do less:
 * jpeg_skip_scanlines() skips rows above the crop (entropy decoding only), jpeg_crop_scanline() restricts the
 * columns decoded, and rows below the crop are never read. With DCT scaling (scale_denom 2/4/8, Pillow's draft
 * mode) on top. The pixels are those of a full decode (ISLOW DCT, fancy upsampling: libjpeg's defaults, which
 * Pillow and OpenCV use); tests/test_data_transforms.py checks this against cv2.imdecode for random crops.
 *
 * Two functions, both taking any bytes-like object:
 *   header(data) -> (width, height, components, jpeg_color_space) or raises ValueError
 *   decode_crop(data, top, left, height, width, scale_denom) -> bytearray of height x width x 3 RGB bytes
 *   the crop is given in the coordinates of the scaled image (ceil(W / denom) x ceil(H / denom)).
 * Errors (corrupt data, a truncated file, unsupported colour space, crop outside the image) raise ValueError with
 * libjpeg's message.
 * The GIL is released while decoding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct error_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct error_mgr *err = (struct error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    /* A truncated file is an error, as in OpenCV (libjpeg would fill the missing rows with grey); other warnings
     * (e.g. extraneous bytes before a marker, common on the web and harmless) and trace messages are ignored. */
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) on_error(cinfo);
}

static void init_errors(struct jpeg_decompress_struct *cinfo, struct error_mgr *err) {
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->message[0] = '\0';
}

static PyObject *header(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*:header", &buf)) return NULL;
    struct jpeg_decompress_struct cinfo;
    struct error_mgr err;
    init_errors(&cinfo, &err);
    int failed = 0;
    if (setjmp(err.jump)) {
        failed = 1;
    } else {
        jpeg_create_decompress(&cinfo);
        jpeg_mem_src(&cinfo, (const unsigned char *)buf.buf, (unsigned long)buf.len);
        jpeg_read_header(&cinfo, TRUE);
    }
    PyObject *result = NULL;
    if (failed) {
        PyErr_Format(PyExc_ValueError, "not a readable JPEG (%s)", err.message);
    } else {
        result = Py_BuildValue("(IIii)", (unsigned int)cinfo.image_width, (unsigned int)cinfo.image_height,
                               cinfo.num_components, (int)cinfo.jpeg_color_space);
    }
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&buf);
    return result;
}

/* Decode rows [top, top + height) and columns [left, left + width) of the image scaled by 1/denom into `pixels`
 * (height x width x 3 RGB bytes; `capacity` bytes of room for the margins while decoding). Returns 0, or -1 with
 * err->message set. */
static int decode_region(const unsigned char *data, size_t len, unsigned int top, unsigned int left,
                         unsigned int height, unsigned int width, unsigned int denom, unsigned char *pixels,
                         size_t capacity, struct error_mgr *err) {
    struct jpeg_decompress_struct cinfo;
    volatile int failed = 0;
    init_errors(&cinfo, err);
    if (setjmp(err->jump)) {
        failed = 1;
    } else {
        jpeg_create_decompress(&cinfo);
        jpeg_mem_src(&cinfo, data, (unsigned long)len);
        jpeg_read_header(&cinfo, TRUE);
        if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
            snprintf(err->message, JMSG_LENGTH_MAX, "CMYK/YCCK JPEGs are not supported by the crop decoder");
            failed = 1;
        } else {
            cinfo.out_color_space = JCS_RGB;
            cinfo.scale_num = 1;
            cinfo.scale_denom = denom;
            jpeg_start_decompress(&cinfo);
            if (width == 0 || height == 0 || (unsigned long long)left + width > cinfo.output_width ||
                (unsigned long long)top + height > cinfo.output_height) {
                snprintf(err->message, JMSG_LENGTH_MAX, "crop %ux%u at (%u, %u) outside the %ux%u image", width,
                         height, left, top, cinfo.output_width, cinfo.output_height);
                failed = 1;
            } else {
                /* Decode a margin around the crop: fancy upsampling treats the edges of the decoded region as
                 * image edges, so the crop's own edge columns need their neighbours (rows are exact: libjpeg
                 * decodes them sequentially with their context). Left: >= 1 pixel, which jpeg_crop_scanline
                 * widens to the iMCU boundary; right: one iMCU. */
                unsigned int imcu = (unsigned int)(cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size);
                unsigned int right = left + width + imcu;
                if (right > cinfo.output_width) right = cinfo.output_width;
                JDIMENSION x0 = left > 0 ? left - 1 : 0;
                JDIMENSION w = right - x0;
                if (x0 > 0 || w < cinfo.output_width) jpeg_crop_scanline(&cinfo, &x0, &w);
                size_t stride = (size_t)w * 3;
                if (stride * height > capacity) {
                    snprintf(err->message, JMSG_LENGTH_MAX, "crop row of %u pixels exceeds the buffer", w);
                    failed = 1;
                } else {
                    if (top > 0) jpeg_skip_scanlines(&cinfo, top);
                    JSAMPROW rows[16];
                    unsigned int done = 0;
                    while (done < height) {
                        unsigned int n = height - done < 16 ? height - done : 16;
                        for (unsigned int i = 0; i < n; i++) rows[i] = pixels + (size_t)(done + i) * stride;
                        JDIMENSION got = jpeg_read_scanlines(&cinfo, rows, n);
                        if (got == 0) {
                            snprintf(err->message, JMSG_LENGTH_MAX, "decoder returned no rows");
                            failed = 1;
                            break;
                        }
                        done += got;
                    }
                    /* compact the rows in place to exactly `width` pixels (an HxWx3 array without a copy) */
                    size_t shift = (size_t)(left - x0) * 3, row = (size_t)width * 3;
                    if (!failed && (shift != 0 || row != stride))
                        for (unsigned int r = 0; r < height; r++)
                            memmove(pixels + r * row, pixels + r * stride + shift, row);
                }
            }
        }
    }
    jpeg_destroy_decompress(&cinfo); /* also aborts: rows below the crop are never decoded */
    return failed ? -1 : 0;
}

static PyObject *decode_crop(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    unsigned int top, left, height, width, denom;
    if (!PyArg_ParseTuple(args, "y*IIIII:decode_crop", &buf, &top, &left, &height, &width, &denom)) return NULL;
    if (denom != 1 && denom != 2 && denom != 4 && denom != 8) {
        PyBuffer_Release(&buf);
        return PyErr_Format(PyExc_ValueError, "scale_denom must be 1, 2, 4 or 8, got %u", denom);
    }
    /* the margins add at most one iMCU on each side (32 pixels: 4x horizontal subsampling at full scale) */
    size_t capacity = ((size_t)width + 64) * 3 * height;
    PyObject *array = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)capacity);
    if (array == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    unsigned char *pixels = (unsigned char *)PyByteArray_AS_STRING(array);
    struct error_mgr err;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = decode_region((const unsigned char *)buf.buf, (size_t)buf.len, top, left, height, width, denom, pixels,
                       capacity, &err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (rc != 0) {
        Py_DECREF(array);
        return PyErr_Format(PyExc_ValueError, "JPEG decode failed (%s)", err.message);
    }
    if (PyByteArray_Resize(array, (Py_ssize_t)width * 3 * height) != 0) {
        Py_DECREF(array);
        return NULL;
    }
    return array;
}

static PyMethodDef methods[] = {
    {"header", header, METH_VARARGS, "header(data) -> (width, height, components, jpeg_color_space)"},
    {"decode_crop", decode_crop, METH_VARARGS,
     "decode_crop(data, top, left, height, width, scale_denom) -> bytearray of height x width x 3 RGB bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpegcrop", "Region-of-interest JPEG decoding.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__jpegcrop(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyModule_AddIntConstant(m, "LIBJPEG_VERSION", JPEG_LIB_VERSION);
    return m;
}
