#ifndef DSV3_VERSION_H
#define DSV3_VERSION_H
#define DSV3_VERSION "0.1.0"
#endif
